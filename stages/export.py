"""Stage export: models/model.pth -> export/{model.pth,weights.h5,model.pt2[,model.onnx]}.

The shipped config carries evaluate.flip_tta and the temperature evaluate fitted on the
validation split (reports/evaluate/calibration.json), so `fmnist predict` prints calibrated
probabilities. Each file is reloaded and must reproduce the trained model's logits on test
images; the parity results go to reports/export/parity.json, inference speed to timing.json.
export/ and reports/export/ are published together.
"""

from __future__ import annotations

from fmnist.signals import handle_signals_while_importing

STAGE = "export"
if __name__ == "__main__":  # a script, not a spawned worker's or a test's import
    handle_signals_while_importing(STAGE)  # first: Ctrl-C during the imports below is one line too

from typing import Any

from fmnist.atomic import publishing, write_json
from fmnist.calibration import read_temperature
from fmnist.constants import (
    CALIBRATION_FILE,
    EXPORT_DIR,
    EXPORT_REPORT_DIR,
    MODEL_FILE,
    PREPARED_FILE,
)
from fmnist.data import load_prepared
from fmnist.export import require_onnx, run_export
from fmnist.model import shipped_config
from fmnist.modelfile import model_from_payload, read_model_file
from fmnist.stage import run_stage


def main(params: dict[str, Any]) -> None:
    p = params["export"]
    if p["onnx"]:
        require_onnx()  # fail before any work
    payload = read_model_file(MODEL_FILE)
    payload["model_config"] = shipped_config(
        payload["model_config"], params["evaluate"]["flip_tta"], read_temperature(CALIBRATION_FILE)
    )
    model = model_from_payload(payload, MODEL_FILE)
    images = load_prepared(PREPARED_FILE).test.images[: p["parity_samples"]]
    with publishing() as outputs:  # export/ and reports/export/ together, or neither
        result = run_export(
            model,
            payload["model_config"],
            images,
            EXPORT_DIR,
            onnx=p["onnx"],
            parity_atol=p["parity_atol"],
            benchmark_batch_size=p["benchmark_batch_size"],
            publication=outputs,
        )
        reports = outputs.folder(EXPORT_REPORT_DIR)
        write_json(reports / "parity.json", result.metrics)
        write_json(reports / "timing.json", result.timing)
    for fmt, info in result.metrics["formats"].items():
        speed = result.timing["formats"][fmt]
        print(
            f"export: {result.files[fmt]} {info['bytes']:,} bytes, max |diff| "
            f"{info['max_abs_diff']:.3g}, {speed['single_images_per_s']:,.0f} img/s single, "
            f"{speed['batched_images_per_s']:,.0f} img/s batched"
        )
    print(f"export: parity ok on {len(images):,} test images -> {EXPORT_DIR}/")


if __name__ == "__main__":
    run_stage(STAGE, main)
