#!/usr/bin/env bash
# Reproducible mini-experiment: does paired training put the shared content in codebook 1 and
# the channel in codebook 2? Trains a small mono and a small paired model on the synthetic
# em32 scene set for the same number of optimizer steps, then prints evaluate.py's table.
#
#   bash scripts/mini_experiment.sh [WORK_DIR]      (default: runs/mini_experiment)
#
# Environment: EPOCHS (default 6) x STEPS optimizer steps per epoch (default 100), both modes;
# EVAL_PAIRS / EVAL_CHANNELS for the second evaluation (EVAL_PAIRS=0 skips it); WANDB
# (disabled | offline | online, default disabled); PYTHON (default: the project's .venv).
# `make demo` runs it shorter, with wandb offline, in runs/demo.
# Duration with the defaults (+preset=demo, 600 steps per mode) on 2 CPU cores: see README.
# Re-running reuses the generated data.
# Note: both runs take the same steps with the same batch size (4 items), so the paired
# model sees 2 channels per item, i.e. twice the segments of the mono model.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mkdir -p "${1:-$here/runs/mini_experiment}" && cd "${1:-$here/runs/mini_experiment}" && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"
epochs="${EPOCHS:-6}"
wandb_mode="${WANDB:-disabled}"
steps="${STEPS:-100}"
data="$work/data"
start=$SECONDS

phase() { echo "== [$(( (SECONDS - start) / 60 ))m$(( (SECONDS - start) % 60 ))s] $*"; }

if [ ! -f "$data/.complete" ]; then
  phase "synthetic scene set -> $data"
  "$py" "$here/synth_eigenscape.py" --out "$data" --files-per-class 2 --seconds 20 --seed 0
  touch "$data/.complete"
fi

# An epoch of exactly $steps steps: fixed_length = steps x the demo preset's batch of 4 items.
common=(+preset=demo "datasets.data_root=$data" "common.max_epoch=$epochs"
        "datasets.fixed_length=$(( steps * 4 ))" "common.max_steps_per_epoch=$steps"
        common.device=cpu "wandb.mode=$wandb_mode")
train() {  # train MODE SCRIPT CONFIG
  phase "training $1 ($epochs epochs x $steps steps)"
  rm -rf "$work/$1"
  "$py" "$here/$2" --config-name="$3" "${common[@]}" \
    "checkpoint.save_folder=$work/$1" "hydra.run.dir=$work/$1/hydra"
}
train mono train_single_gpu.py config_mono_nq2
train paired train_paired_gpu.py config_paired_nq2

latest() {  # the newest rotating checkpoint (names sort by epoch and step)
  local found
  found="$(ls -1 "$work/$1"/ckpt_*.pt 2>/dev/null | sort | tail -n 1)"
  [ -n "$found" ] || { echo "no checkpoint in $work/$1" >&2; exit 1; }
  echo "$found"
}
evaluate() {  # evaluate OUT_DIR [overrides...]
  local out="$1"; shift
  "$py" "$here/evaluate.py" "checkpoints=['$(latest mono)','$(latest paired)']" "labels=[mono,paired]" \
    "datasets.data_root=$data" "out_dir=$work/$out" device=cpu "$@"
}
phase "evaluating on the fixed validation pairs (as logged during training)"
evaluate report
# With 32 channels and 32 pairs most channels occur once: the probe cannot learn them. Four
# well-separated capsules and more pairs give it enough views per channel.
if [ "${EVAL_PAIRS:-128}" -gt 0 ]; then
  phase "evaluating on ${EVAL_PAIRS:-128} pairs of channels ${EVAL_CHANNELS:-[0,8,16,24]} (powered probe)"
  evaluate report_4ch "datasets.val_pairs=${EVAL_PAIRS:-128}" "datasets.channels=${EVAL_CHANNELS:-[0,8,16,24]}"
fi
phase "done"
cat <<EOF
Where things are (under $work):
  data/                         synthetic EigenScape-shaped scene set (32 ch, 48 kHz)
  mono/, paired/                checkpoints (ckpt_*.pt, best.pt) of each mode
  mono/audio/, paired/audio/    validation inputs and reconstructions (WAV, per epoch)
  mono/hydra/, paired/hydra/    train.log and the resolved Hydra config
  mono/wandb/, paired/wandb/    wandb run files (when WANDB=offline; sync with 'wandb sync')
  report/                       metrics.json, report.md, PNG plots (mono vs paired)
EOF
