#!/usr/bin/env bash
# The common starting point of the study and the demo: a small mono codec (+preset=demo:
# 8 filters, 64-dim latent, 2 x 1024 codes = 1.5 kbps) trained on the synthetic em32 set,
# exported (weights and config only, ~4 MB) to pretrained/start_demo.pt.
#
#   bash scripts/pretrain_start.sh [WORK_DIR [OVERRIDES...]]   (default: runs/pretrain)
#
# OVERRIDES are extra Hydra overrides of the training, e.g. docs/study.md's control without
# gain jitter: OUT=runs/start_nojitter.pt bash scripts/pretrain_start.sh runs/pretrain_nojitter
# datasets.gain_jitter_db=0
#
# Environment: STEPS (default 6000 optimizer steps, batch 4 x 0.4 s), OUT (default
# pretrained/start_demo.pt), WANDB (default disabled), SYNTH_FILES / SYNTH_SECONDS (see
# scripts/lib.sh). One thread on 2 CPU cores: about 2 hours (measured: see docs/study.md).
# Every variant of scripts/paired_study.sh and `make demo` fine-tunes from the result for
# the same number of steps, so none of them starts with an advantage.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
work="$(mkdir -p "${1:-$here/runs/pretrain}" && cd "${1:-$here/runs/pretrain}" && pwd)"
steps="${STEPS:-6000}"
out="${OUT:-$here/pretrained/start_demo.pt}"
per_epoch=500
synth_set "$work/data"

phase "mono pretraining: $steps steps"
"$py" "$here/train_single_gpu.py" --config-name=config_mono_nq2 +preset=demo \
  "datasets.data_root=$work/data" datasets.format=prepared datasets.num_workers=0 \
  "common.max_epoch=$(( (steps + per_epoch - 1) / per_epoch ))" \
  "datasets.fixed_length=$(( per_epoch * 4 ))" "common.max_steps_per_epoch=$per_epoch" \
  common.val_interval=4 common.save_interval=2 checkpoint.keep_last=20 common.log_interval=100 \
  common.device=cpu "wandb.mode=${WANDB:-disabled}" checkpoint.resume=true \
  "checkpoint.save_folder=$work/mono" "hydra.run.dir=$work/mono/hydra" "${@:2}"

mkdir -p "$(dirname "$out")"
"$py" -c "import sys; sys.path.insert(0, '$here'); from utils import checkpoints; print('wrote', checkpoints.export_start_point('$(latest_checkpoint "$work/mono")', '$out'))"
phase "done"
