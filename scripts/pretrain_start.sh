#!/usr/bin/env bash
# The common starting point of the study and the demo: a small mono codec (+preset=demo:
# 8 filters, 64-dim latent, 2 x 1024 codes = 1.5 kbps), exported (weights and config only,
# ~4 MB) to pretrained/start_demo.pt. Two stages, each resumable (re-run the same command
# after a kill: it goes on from the last checkpoint):
#   1. STEPS steps on the procedural synthetic em32 set (from scratch);
#   2. with REAL=DIR, REAL_STEPS more from stage 1's result on a set whose point sources and
#      beds are, for a share REAL_SHARE, real recordings from DIR (scripts/real_material.sh
#      gathers the committed start point's material; docs/study.md says which), and whose
#      capsule self-noise and beds each file moves by a draw from REAL_SELF_NOISE_DB (default
#      "-40 0" dB) and REAL_BED_DB (default "-30 0"): a codec that only hears a bed and the
#      em32's noise floor under every sound decodes hiss and filled pauses onto clean sound.
#
#   bash scripts/pretrain_start.sh [WORK_DIR [OVERRIDES...]]   (default: runs/pretrain)
#
# OVERRIDES are extra Hydra overrides of both stages, e.g. docs/study.md's control without
# gain jitter: OUT=runs/start_nojitter.pt bash scripts/pretrain_start.sh runs/pretrain_nojitter
# datasets.gain_jitter_db=0
#
# Environment: STEPS (default 6000 optimizer steps, batch 4 x 0.4 s), START (a checkpoint to
# use instead of running stage 1, e.g. an earlier export of it), REAL, REAL_STEPS (default
# 3000), REAL_SHARE (default 0.5), OUT (default pretrained/start_demo.pt), WANDB (default
# disabled), SYNTH_FILES / SYNTH_SECONDS (see scripts/lib.sh). One thread on 2 CPU cores:
# 1-4 steps a second (stage 1 about 1-1.5 hours, stage 2 about 20 minutes; docs/study.md).
# Every variant of scripts/paired_study.sh and `make demo` fine-tunes from the result for
# the same number of steps, so none of them starts with an advantage.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
work="$(mkdir -p "${1:-$here/runs/pretrain}" && cd "${1:-$here/runs/pretrain}" && pwd)"
out="${OUT:-$here/pretrained/start_demo.pt}"
per_epoch=500

# train_stage NAME DATA STEPS [OVERRIDES...]: mono training into $work/NAME, resumable.
train_stage() {
  local name="$1" data="$2" steps="$3"
  phase "mono pretraining, $name: $steps steps"
  "$py" "$here/train_single_gpu.py" --config-name=config_mono_nq2 +preset=demo \
    "datasets.data_root=$data" datasets.format=prepared datasets.num_workers=0 \
    "common.max_epoch=$(( (steps + per_epoch - 1) / per_epoch ))" \
    "datasets.fixed_length=$(( per_epoch * 4 ))" "common.max_steps_per_epoch=$per_epoch" \
    common.val_interval=4 common.save_interval=2 checkpoint.keep_last=20 common.log_interval=100 \
    common.device=cpu "wandb.mode=${WANDB:-disabled}" checkpoint.resume=true \
    "checkpoint.save_folder=$work/$name" "hydra.run.dir=$work/$name/hydra" "${@:4}"
}

if [ -n "${START:-}" ]; then
  start="$START"
else
  synth_set "$work/data"
  train_stage mono "$work/data" "${STEPS:-6000}" "${@:2}"
  start="$(latest_checkpoint "$work/mono")"
fi
final="$start"
if [ -n "${REAL:-}" ]; then
  SYNTH_SOURCES="$REAL" SYNTH_REAL_SHARE="${REAL_SHARE:-0.5}" \
    SYNTH_SELF_NOISE_DB="${REAL_SELF_NOISE_DB:--40 0}" SYNTH_BED_DB="${REAL_BED_DB:--30 0}" \
    synth_set "$work/data_real"
  train_stage real "$work/data_real" "${REAL_STEPS:-3000}" "model.init_from=$start" "${@:2}"
  final="$(latest_checkpoint "$work/real")"
fi

mkdir -p "$(dirname "$out")"
imports="import sys; sys.path.insert(0, '$here'); from utils import checkpoints"
"$py" -c "$imports; print('wrote', checkpoints.export_start_point('$final', '$out'))"
phase "done"
