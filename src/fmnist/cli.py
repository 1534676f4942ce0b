"""The `fmnist` command: `fmnist predict IMAGE... [--model export/model.pth] [--top-k 3] [--json]`
and `fmnist tune-worker [--storage URL] [--study NAME]`.

predict's exit status: 0 when every image was classified, 1 when some image could not be read
(each one gets one line on stderr, the others are still classified), 2 for a bad command line or
a model file that cannot be used, 130 for Ctrl-C and 143 for SIGTERM (one line, and no results
unless they were already being printed; torch's import included), 141 (quietly) when the
reader of its output went away (`| head`). File names are printed with control characters
and bytes that are not UTF-8 escaped. tune-worker's are the tune stage's (0, 1 for a failure,
2 for bad params, 130/143 when interrupted). Never a traceback for a user's mistake.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence

from fmnist import __version__, signals
from fmnist.constants import EXPORT_DIR, NUM_CLASSES
from fmnist.errors import FmnistError

EXIT_OK = 0
EXIT_BAD_IMAGE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
DEFAULT_MODEL = f"{EXPORT_DIR}/model.pth"


def _class_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= NUM_CLASSES:
        raise argparse.ArgumentTypeError(
            f"must be 1 to {NUM_CLASSES} (the classes there are), got {value}")
    return value


def _model_path(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("empty path")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmnist", description="Fashion-MNIST CNN trained with SAM."
    )
    parser.add_argument("--version", action="version", version=f"fmnist {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    predict = commands.add_parser(
        "predict",
        help="classify image files",
        description=(
            "Classify PNG/JPEG files (any size or mode). Images are converted to grayscale, "
            "trimmed, resized to fit 28x28 keeping the aspect ratio and centred, like "
            "Fashion-MNIST: a light object on a dark background. Use --invert for photos of "
            "dark objects on a light background (inversion is never guessed)."
        ),
    )
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    predict.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        type=_model_path,
        help=f"model file, .pth, .h5 or .pt2 (default: {DEFAULT_MODEL})",
    )
    predict.add_argument(
        "--top-k", type=_class_count, default=3,
        help=f"classes shown per image, 1 to {NUM_CLASSES} (default: 3)",
    )
    predict.add_argument("--json", action="store_true", help="print one JSON document")
    predict.add_argument(
        "--invert", action="store_true", help="negate the images first (dark-on-light photos)"
    )
    worker = commands.add_parser(
        "tune-worker",
        help="run trials of the tune stage's shared study (another machine's worker)",
        description=(
            "Join the study the tune stage searches and run its trials until the budget is "
            "met. Run from the repository root with the same params.yaml and data/prepared."
        ),
    )
    worker.add_argument("--storage", metavar="URL", help="database URL (default: "
                        "tune.storage, else the SQLite file under checkpoints/tune/)")
    worker.add_argument("--study", metavar="NAME",
                        help="study name to join; refuses if params.yaml differs")
    return parser


def run_tune_worker(args: argparse.Namespace) -> int:
    """One more worker, through the tune stage's own entry (one-line errors, exit codes)."""
    signals.handle_signals_while_importing("tune")  # torch's import takes seconds
    from fmnist.tune import main as tune_main

    argv = ["worker"] + [f"{option}={value}" for option, value in
                         (("--storage", args.storage), ("--study", args.study))
                         if value is not None]
    tune_main(argv)
    return EXIT_OK


def run_predict(args: argparse.Namespace) -> int:
    """Load the model once, read every image, classify the readable ones in one batch."""
    from fmnist.predict import (  # torch loads only when a command needs it
        Prediction,
        as_text,
        classify,
        has_light_background,
        load_classifier,
        load_image,
        printable,
        to_model_input,
    )

    signals.check()  # a signal during the import whose exception a finalizer swallowed
    try:
        classifier = load_classifier(args.model)
    except FmnistError as exc:
        print(f"fmnist predict: {printable(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    readable: list[tuple[str, bool]] = []
    arrays = []
    errors: list[dict[str, str]] = []
    for name in args.images:
        try:
            image = load_image(name)
        except FmnistError as exc:
            print(f"fmnist predict: {printable(str(exc))}", file=sys.stderr)
            errors.append({"file": as_text(name), "error": as_text(str(exc))})
            continue
        arrays.append(to_model_input(image, invert=args.invert))
        readable.append((as_text(name), has_light_background(image)))
    ranked = classify(classifier, arrays, top_k=args.top_k)
    signals.check()  # interrupted (h5py's finalizers swallow it): no results, its exit code
    predictions = [
        Prediction(file=name, top_k=top, inverted=args.invert, light_background=light)
        for (name, light), top in zip(readable, ranked, strict=True)
    ]
    if args.json:
        document = {
            "model": as_text(str(classifier.source)),
            "predictions": [p.as_dict() for p in predictions],
            "errors": errors,
        }
        print(json.dumps(document, indent=2))
    else:
        for p in predictions:
            shown = ", ".join(f"{name} {prob:.1%}" for name, _, prob in p.top_k)
            print(f"{printable(p.file)}: {shown}")
    hinted = [p.file for p in predictions if p.light_background and not p.inverted]
    if hinted:
        print(
            f"fmnist predict: note: {len(hinted)} image(s) have a light background "
            f"(e.g. {printable(hinted[0])}); the model expects light objects on dark: try --invert",
            file=sys.stderr,
        )
    return EXIT_BAD_IMAGE if errors else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fmnist` console script; returns the exit status (tune-worker exits
    as the tune stage does, through SystemExit)."""
    args = build_parser().parse_args(argv)
    if args.command == "tune-worker":
        try:
            return run_tune_worker(args)
        except FmnistError as exc:
            print(f"fmnist {args.command}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:  # the tune stage's handlers turn signals into exits first
            print("fmnist tune-worker: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
    with signals.restored():  # `main` may run more than once in a process
        signals.install()  # SIGTERM, like Ctrl-C, raises Interrupted; one swallowed is recorded
        try:
            status = run_predict(args)
            sys.stdout.flush()  # a reader gone (`| head`) shows here, not at the exit's flush
            signals.check()
            return status
        except Exception as exc:  # noqa: BLE001 - an interrupt a library turned into its error
            signum = signals.received()
            if signum is not None:
                return _interrupted(args.command, signum)
            if isinstance(exc, BrokenPipeError):
                # what is left in the buffer has no reader: drop it, as `yes | head` does
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
                return EXIT_BROKEN_PIPE
            if isinstance(exc, FmnistError):
                from fmnist.predict import printable

                print(f"fmnist {args.command}: {printable(str(exc))}", file=sys.stderr)
                return EXIT_USAGE
            raise
        except KeyboardInterrupt:
            return _interrupted(args.command, signals.received() or signal.SIGINT)


def _interrupted(command: str, signum: int) -> int:
    print(f"fmnist {command}: {signals.interrupted(signum)}", file=sys.stderr)
    return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
