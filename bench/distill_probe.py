"""Distillation probe: does a wide teacher's knowledge buy the default-sized model the accuracy
its width would? A measurement for issue 14, not a pipeline feature (yet).

Run from the repository root, after `dvc repro preprocess`:

    python bench/distill_probe.py                           # teacher late-h16 seed 0, then
                                                            # late-n16 students, seeds 0-2
    python bench/distill_probe.py --students late-e16 --seeds 0 --alpha 0.9

The teacher is a `bench/time_to_accuracy.py` recipe trained with the train stage's `fit`; its
flip-TTA logits on the training split are computed once and kept under
checkpoints/distill_probe/ (resume state, not results). Each student is the same `fit` and
scoring as `time_to_accuracy.run_one`, with the training loss replaced by

    (1 - alpha) * label-smoothed cross-entropy + alpha * T^2 * KL(teacher_T || student_T)

where `_T` is a softmax at temperature T. The probe swaps two names inside fmnist.train for
the run's duration (`augment_batch`, to look up each batch's teacher logits by image content
before augmenting it, and `nn`, for the loss `fit` builds), so the library stays unchanged
until the result earns a param. The teacher's flip-TTA logits are the same for an image and
its mirror, so with flips only (late-n16) they are exactly the teacher's view of each
augmented image; with 1-pixel crops (late-e16) they are the unshifted image's.

Runs are appended to bench/results/distill_probe.json as each ends (keyed like
time_to_accuracy's, plus teacher and loss), so the probe resumes; the table goes to
distill_probe.md. Teacher seconds are reported apart: a pipeline would pay them once per
teacher (a cached stage), not per experiment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import time_to_accuracy as tta  # noqa: E402  (bench scripts share one definition)

import fmnist.train as train_module  # noqa: E402
from fmnist.accel import cpu_class, dtype_name, select_backend  # noqa: E402
from fmnist.atomic import write_json, write_text  # noqa: E402
from fmnist.checkpoint import array_digest  # noqa: E402
from fmnist.data import load_prepared  # noqa: E402
from fmnist.inference import predict_logits  # noqa: E402
from fmnist.model import build_model  # noqa: E402
from fmnist.params import load_params  # noqa: E402
from fmnist.reproducibility import configure_torch  # noqa: E402

CACHE_DIR = ROOT / "checkpoints" / "distill_probe"


def distill_loss(
    logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, *,
    label_smoothing: float, alpha: float, temperature: float,
) -> torch.Tensor:
    """Hinton et al.'s mix; T^2 keeps the soft term's gradient scale independent of T."""
    logits = logits.float()
    hard = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if alpha == 0:
        return hard
    soft = F.kl_div(F.log_softmax(logits / temperature, dim=1),
                    F.softmax(teacher / temperature, dim=1), reduction="batchmean")
    return (1 - alpha) * hard + alpha * temperature**2 * soft


def image_keys(images: np.ndarray | torch.Tensor) -> list[bytes]:
    """One key per image from its raw uint8 pixels (batches arrive as float copies of them)."""
    pixels = np.asarray(images, dtype=np.float32).reshape(len(images), -1).astype(np.uint8)
    return [row.tobytes() for row in pixels]


class TeacherTargets:
    """The teacher's logits for each training image, found from the batch's pixels."""

    def __init__(self, images: np.ndarray, logits: np.ndarray) -> None:
        # Identical images (Fashion-MNIST has a few) get identical logits: any row will do.
        self.row = {key: i for i, key in enumerate(image_keys(images))}
        self.logits = torch.as_tensor(logits, dtype=torch.float32)
        self.current: torch.Tensor | None = None

    def look_up(self, batch: torch.Tensor) -> None:
        rows = [self.row[key] for key in image_keys(batch.numpy())]
        self.current = self.logits[rows]  # on the CPU, where batches are looked up


@contextlib.contextmanager
def distilling(targets: TeacherTargets, alpha: float, temperature: float) -> Iterator[None]:
    """fmnist.train's `fit` trains with distill_loss while this is open."""
    original_augment, original_nn = train_module.augment_batch, train_module.nn

    def augment_batch(x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        targets.look_up(x)  # before flips and crops: the image as stored
        return original_augment(x, **kwargs)

    def cross_entropy_loss(label_smoothing: float = 0.0) -> Any:
        def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return distill_loss(logits, labels, targets.current.to(logits.device),
                                label_smoothing=label_smoothing, alpha=alpha,
                                temperature=temperature)
        return loss

    train_module.augment_batch = augment_batch
    train_module.nn = types.SimpleNamespace(**{**vars(nn), "CrossEntropyLoss": cross_entropy_loss})
    try:
        yield
    finally:
        train_module.augment_batch, train_module.nn = original_augment, original_nn


def teacher_logits(data: Any, base: dict[str, Any], record: dict[str, Any]) -> np.ndarray:
    """Train (or load) the teacher `record` names; its flip-TTA logits on the training split,
    cached per recipe, seed, CPU class, dtype and training images."""
    recipe, seed = record["recipe"], record["seed"]
    params = tta.recipe_params(base, tta.RECIPES[recipe], seed)
    data_digest = array_digest(data.train.images, data.train.labels)[:12]
    stem = CACHE_DIR / (f"teacher-{recipe}-{record['recipe_hash']}-s{seed}-{cpu_class()}-"
                        f"{record['dtype']}-{data_digest}")
    weights, logits_file = stem.with_suffix(".pt"), stem.with_suffix(".logits.npy")
    timing = stem.with_suffix(".json")  # its seconds and test accuracy, for runs that load it
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    model = build_model(params["model"])
    if weights.exists():
        model.load_state_dict(torch.load(weights))
    else:
        print(f"distill_probe: training teacher {recipe} seed {seed}", file=sys.stderr)
        start = time.perf_counter()
        model = tta.fit(data, params, progress=True).model
        write_json(timing, {"train_seconds": time.perf_counter() - start})
        logits_file.unlink(missing_ok=True)  # another teacher's
        torch.save(model.state_dict(), weights)
    model.eval()
    model.flip_tta = True
    if "test_acc_flip_tta" not in read_timing(timing):  # scored once per teacher
        test = predict_logits(model, data.test.images, batch_size=1000)
        accuracy = float(np.mean(test.argmax(1) == data.test.labels))
        write_json(timing, {**read_timing(timing), "test_acc_flip_tta": accuracy})
    if not logits_file.exists():
        start = time.perf_counter()
        np.save(logits_file, predict_logits(model, data.train.images, batch_size=1000))
        write_json(timing, {**read_timing(timing), "logits_seconds": time.perf_counter() - start})
    record.update(read_timing(timing))
    logits = np.load(logits_file)
    if len(logits) != len(data.train.labels):
        raise SystemExit(f"distill_probe: {logits_file}: {len(logits)} rows for "
                         f"{len(data.train.labels)} training images; delete it")
    return logits


def read_timing(path: Path) -> dict[str, float]:
    return json.loads(path.read_text()) if path.exists() else {}


def summary(runs: list[dict[str, Any]]) -> str:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        key = (tta.class_label(run), run["dtype"], run["recipe"], run["recipe_hash"],
               run["teacher"]["recipe"], run["teacher"]["recipe_hash"], run["teacher"]["seed"],
               run["alpha"], run["temperature"])
        groups.setdefault(key, []).append(run)
    lines = [
        "# Distillation probe",
        "",
        "Generated by `python bench/distill_probe.py` from `distill_probe.json`. Student seconds:"
        " the train stage's `fit` with the teacher's logits looked up per batch; teacher "
        "seconds apart (once per teacher). Accuracy: the float32 student on the 10,000 test "
        "images with flip TTA (`plain`: without it).",
        "",
        "| CPU class | dtype | student | teacher (test acc, train s) | alpha, T | seeds | "
        "test acc mean ± std (min) | plain | student train s |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for (label, dtype, recipe, _, teacher, _, tseed, alpha, temp), group in sorted(
            groups.items()):
        accs = [r["test_acc_flip_tta"] for r in group]
        plain = statistics.fmean(r["test_acc"] for r in group)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        low, high = (f"{f(r['train_seconds'] for r in group):.0f}" for f in (min, max))
        about = group[0]["teacher"]
        teacher_s = (f"{about['train_seconds']:.0f} s + {about.get('logits_seconds', 0):.0f} s "
                     "logits" if "train_seconds" in about else "? s")
        lines.append(
            f"| {label} | {dtype} | {recipe} | {teacher} seed {tseed} "
            f"({about['test_acc_flip_tta']:.2%}, {teacher_s}) | {alpha}, {temp} | "
            f"{len(group)} | {statistics.fmean(accs):.2%} ± {std:.2%} ({min(accs):.2%}) | "
            f"{plain:.2%} | {low if low == high else f'{low}-{high}'} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="late-h16", help="a time_to_accuracy recipe")
    parser.add_argument("--teacher-seed", type=int, default=0)
    parser.add_argument("--students", default="late-n16",
                        help="comma-separated time_to_accuracy recipes")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=str(ROOT / tta.PREPARED_FILE))
    parser.add_argument("--json", default=str(tta.RESULTS / "distill_probe.json"))
    parser.add_argument("--markdown", default=str(tta.RESULTS / "distill_probe.md"))
    args = parser.parse_args(argv)
    for name in [args.teacher, *args.students.split(",")]:
        if name not in tta.RECIPES:
            parser.error(f"unknown recipe {name!r}")
    if not 0 <= args.alpha <= 1 or args.temperature <= 0:
        parser.error("--alpha must be in [0, 1] and --temperature above 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = load_params(ROOT / "params.yaml")
    store = Path(args.json)
    runs = tta.stored_runs(store)
    configure_torch(args.threads)
    dtype = dtype_name(select_backend(base["ipex"], base["train"]["device"]).dtype)
    data = load_prepared(args.data)
    teacher: dict[str, Any] = {
        "recipe": args.teacher, "seed": args.teacher_seed, "dtype": dtype,
        "recipe_hash": tta.recipe_hash(tta.recipe_params(base, tta.RECIPES[args.teacher],
                                                         args.teacher_seed))}
    done = {distill_key(r) for r in runs}
    targets = None
    for name in args.students.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            params = tta.recipe_params(base, tta.RECIPES[name], seed)
            planned = {**tta.planned_run(name, params, dtype, args.threads), "teacher": teacher,
                       "alpha": args.alpha, "temperature": args.temperature}
            if distill_key(planned) in done:
                continue
            if targets is None:
                targets = TeacherTargets(data.train.images,
                                         teacher_logits(data, base, teacher))
            print(f"distill_probe: {name} seed {seed} ({cpu_class()}, {dtype})",
                  file=sys.stderr, flush=True)
            with distilling(targets, args.alpha, args.temperature):
                run = tta.run_one(data, params, name)
            runs.append({**run, "teacher": dict(teacher), "alpha": args.alpha,
                         "temperature": args.temperature})
            write_json(store, {"runs": runs})
    if runs:
        table = summary(runs)
        write_text(args.markdown, table)
        print(table)
    return 0


def distill_key(run: dict[str, Any]) -> str:
    teacher = run["teacher"]
    return "|".join([tta.run_key(run), teacher["recipe"], teacher["recipe_hash"],
                     str(teacher["seed"]), str(run["alpha"]), str(run["temperature"])])


if __name__ == "__main__":
    raise SystemExit(main())
