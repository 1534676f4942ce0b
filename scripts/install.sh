#!/usr/bin/env bash
# Install everything the pipeline needs on a fresh machine; `--test` adds the test tools.
# torch is installed first and pinned: any other version pulls gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

# Offline copy of Fashion-MNIST (Debian package); the download stage falls back to the
# public mirrors when it is absent, so a machine without apt or root still works.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || echo "install: dataset-fashion-mnist unavailable; download will use the mirrors" >&2
  else
    echo "install: not root: skipping apt-get install dataset-fashion-mnist" >&2
  fi
fi

python3 -m pip install -q --disable-pip-version-check "torch==2.13.0"
python3 -m pip install -q --disable-pip-version-check -e ".${extras}"
