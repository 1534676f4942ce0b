#!/usr/bin/env bash
# Build (once) a separate venv with torch 2.8 + IPEX 2.8 and run the IPEX tests in it.
# Usage: bash scripts/ipex-env.sh [pytest args...]   (IPEX_VENV=path overrides .venv-ipex)
# Why a venv: IPEX 2.8 only works with torch 2.8, while the project runs on torch 2.13.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${IPEX_VENV:-.venv-ipex}"
py="$venv/bin/python"
stamp="$venv/.fmnist-installed"

[ -x "$py" ] || python3 -m venv "$venv"

# Reinstall only when the pins or the project's metadata changed since the last install.
if [ ! -f "$stamp" ] || [ requirements-ipex.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  pip_install() { "$py" -m pip install -q --disable-pip-version-check "$@"; }
  pip_install --upgrade pip
  pip_install -r requirements-ipex.txt
  # pyproject pins torch==2.13.0: install the project without deps, and its other deps
  # constrained by requirements-ipex.txt so nothing replaces torch 2.8.
  pip_install -c requirements-ipex.txt numpy pyyaml jsonschema h5py scikit-learn matplotlib \
    tqdm optuna dvclive pillow pytest hypothesis
  pip_install --no-deps -e .
  touch "$stamp"
fi

"$py" - <<'PY'
import intel_extension_for_pytorch as ipex
import torch
print(f"ipex-env: torch {torch.__version__}, ipex {ipex.__version__}")
PY
exec "$py" -m pytest -m ipex tests/test_ipex.py "$@"
