#!/usr/bin/env bash
# Shared launcher of train_paired.sh and run_training.sh.
#   launch.sh SCRIPT CONFIG_NAME [hydra overrides...]
# Environment:
#   EIGENSCAPE_ROOT  data root, passed as datasets.data_root (an explicit override wins)
#   NPROC            processes (GPUs) on this node; > 1 launches through torchrun
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node torchrun rendezvous
#   PYTHON           interpreter (default: the project's .venv, else python3)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
script="$here/$1"; config="$2"; shift 2

py="${PYTHON:-$here/.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"

args=(--config-name="$config")
if [ -n "${EIGENSCAPE_ROOT:-}" ]; then args+=("datasets.data_root=$EIGENSCAPE_ROOT"); fi
args+=("$@")

nproc="${NPROC:-1}"; nnodes="${NNODES:-1}"
if [ "$nproc" -gt 1 ] || [ "$nnodes" -gt 1 ]; then
  # Check the command line once first (`--cfg job` stops after composing): a mistake is then
  # one line, not one per rank under torchrun's own traceback.
  "$py" "$script" "${args[@]}" --cfg job >/dev/null || exit $?
  exec "$py" -m torch.distributed.run --nproc_per_node="$nproc" --nnodes="$nnodes" \
    --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${MASTER_PORT:-29500}" "$script" "${args[@]}"
fi
exec "$py" "$script" "${args[@]}"
