#!/usr/bin/env bash
# The train stage under torchrun, outside DVC: NPROC ranks (default 2) on this machine.
#   scripts/torchrun-train.sh                   # this machine only (--standalone)
#   NPROC=4 scripts/torchrun-train.sh           # 4 ranks
#   scripts/torchrun-train.sh --nnodes=2 --node_rank=K --master_addr=HOST --master_port=29500
#                                               # node K of a 2-machine job: run on each machine
# Any arguments replace --standalone and go to torchrun. Needs train.distributed: true in
# params.yaml. Through DVC, `dvc exp run -S train.distributed=true` runs the same stage under
# torchrun by itself (see README, "Scaling out").
set -euo pipefail
cd "$(dirname "$0")/.."

python - <<'EOF'
import sys

from fmnist.errors import FmnistError
from fmnist.params import load_params

try:
    distributed = load_params()["train"]["distributed"]
except FmnistError as exc:
    sys.exit(f"torchrun-train: {exc}")
if not distributed:
    sys.exit("torchrun-train: params.yaml: train.distributed is false; set it to true "
             "(or train in one process: python stages/train.py)")
EOF

nproc_per_node="${NPROC:-2}"
if [[ "$nproc_per_node" =~ ^[1-9][0-9]*$ ]]; then
  # One share of this machine's cores per rank (torchrun alone would set 1, with a warning).
  threads=$(( $(nproc) / nproc_per_node ))
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}"
fi
rendezvous=("$@")
[ $# -eq 0 ] && rendezvous=(--standalone)
exec python -m torch.distributed.run "${rendezvous[@]}" --nproc_per_node="$nproc_per_node" \
  stages/train.py
