"""download stage: the four Fashion-MNIST files into data/raw, verified, published together."""

from fmnist.signals import handle_signals_while_importing

STAGE = "download"
if __name__ == "__main__":  # a script, not a spawned worker's or a test's import
    handle_signals_while_importing(STAGE)  # first: Ctrl-C during the imports below is one line too

from typing import Any

from fmnist.atomic import publish_dir
from fmnist.constants import RAW_DIR
from fmnist.download import download_all
from fmnist.stage import run_stage


def main(params: dict[str, Any]) -> None:
    data = params["data"]
    with publish_dir(RAW_DIR) as staging:
        used = download_all(data["sources"], staging, timeout=data["timeout_s"])
    for source in dict.fromkeys(used):
        print(f"download: {used.count(source)} file(s) from {source}")


if __name__ == "__main__":
    run_stage(STAGE, main)
