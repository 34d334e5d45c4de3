# Shared pieces of the experiment scripts (sourced, not run):
#   pretrain_start.sh, paired_study.sh (also `make demo`).
# Defines: here (project root), py (interpreter), phase MESSAGE, synth_set DIR,
# latest_checkpoint DIR.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"
_start=$SECONDS

phase() { echo "== [$(( (SECONDS - _start) / 60 ))m$(( (SECONDS - _start) % 60 ))s] $*"; }

# The synthetic em32 scene set of the experiments: 8 classes x SYNTH_FILES files x
# SYNTH_SECONDS s (defaults 4 x 30), seed SYNTH_SEED (default 0), with its 24 kHz int16
# arrays; with SYNTH_SOURCES=DIR, real recordings replace a share SYNTH_REAL_SHARE (default
# 0.5) of the point sources and beds; SYNTH_SELF_NOISE_DB and SYNTH_BED_DB ("LOW HIGH" or
# one value) move the capsule self-noise and the beds per file. The same call gives the same
# set on every machine; re-running reuses it.
synth_set() {
  local data="$1" flags=() span=()
  if [ -n "${SYNTH_SOURCES:-}" ]; then
    flags=(--sources "$SYNTH_SOURCES" --real-share "${SYNTH_REAL_SHARE:-0.5}")
  fi
  if [ -n "${SYNTH_SELF_NOISE_DB:-}" ]; then
    read -r -a span <<< "$SYNTH_SELF_NOISE_DB"
    flags+=(--self-noise-db "${span[@]}")
  fi
  if [ -n "${SYNTH_BED_DB:-}" ]; then
    read -r -a span <<< "$SYNTH_BED_DB"
    flags+=(--bed-db "${span[@]}")
  fi
  if [ ! -f "$data/.complete" ]; then
    phase "synthetic em32 scene set -> $data"
    "$py" "$here/synth_eigenscape.py" --out "$data" --files-per-class "${SYNTH_FILES:-4}" \
      --seconds "${SYNTH_SECONDS:-30}" --seed "${SYNTH_SEED:-0}" "${flags[@]}"
    "$py" "$here/prepare_dataset.py" --data-root "$data" --workers 2
    mkdir -p "$data" && touch "$data/.complete"
  fi
}

# The newest rotating checkpoint of a save folder (names sort by epoch and step).
latest_checkpoint() {
  local found
  found="$(ls -1 "$1"/ckpt_*.pt 2>/dev/null | sort | tail -n 1)"
  [ -n "$found" ] || { echo "no checkpoint in $1" >&2; return 1; }
  echo "$found"
}
