#!/usr/bin/env bash
# The study: does paired training put the shared content in codebook 1 and the channel in
# codebook 2, measurably, against the mono baseline?
#
#   bash scripts/paired_study.sh
#
# Trains the variants `mono` (config_mono_nq2), `mono_split` (config_mono_nq2 on the paired
# default's split quantizer: the mono baseline of the same architecture), `seed`
# (config_paired_nq2 with pairwise=seed model.content_share=0, the design document's recipe),
# `rvq` (the default pairwise recipe on EnCodec's unsplit quantizer, so without the shared
# content code), `xrec` (an earlier default: cross-reconstruction instead of the shared
# content code, code consensus and the level twin), `scc` (the shared content code alone),
# `cons` (the previous default: `scc` with code consensus) and `paired` (config_paired_nq2 as
# it is, the default recipe: `cons` with the level twin); on request also `xrec0` (`xrec`
# without cross-reconstruction). Each is fine-tuned from the same starting point
# (pretrained/start_demo.pt, made by scripts/pretrain_start.sh) for the same optimizer steps
# on the same segments per step: a paired step codes 2 channels of B items, so the mono
# variants take 2B items per step. For SEEDS seeds; every run's per-epoch validation (which
# picks best.pt) sees the `monitor` files of the validation classes, and evaluate.py scores
# every seed's variants side by side on the `held_out` others (datasets.val_files); prints
# the table of mean +- std over seeds (scripts/study_table.py).
#
# Environment:
#   DATA_ROOT  data (default: the synthetic em32 set of scripts/lib.sh, generated in OUT/data,
#              SYNTH_FILES=12 files per class: 18 held-out evaluation files, 6 monitor files)
#   OUT        work folder (default runs/paired_study); checkpoints in OUT/<variant>/seed<N>/
#   SEEDS      seeds per variant (default 3: training seeds FIRST_SEED..FIRST_SEED+SEEDS-1)
#   FIRST_SEED first training seed (default 1)
#   VARIANTS   space-separated subset of "mono mono_split seed rvq xrec xrec0 scc cons paired"
#              (default all but xrec0); a variant NAME:OVERRIDES is the paired config with
#              comma-separated Hydra overrides, e.g. "paired nocue:pairwise.cue_weight=0
#              head:pairwise.ild_head.enabled=true", and NAME:mono,OVERRIDES the mono config
#              with them ("m4:mono,model.content_share=0.25")
#   WANDB      disabled | offline | online (default disabled)
#   STEPS      fine-tuning steps per run (default 800; raise it on a GPU)
#   DEVICE     cpu | cuda (default cpu)
#   START      starting point (default pretrained/start_demo.pt)
#   EVAL_PAIRS validation pairs for the evaluation (default 256)
#   EVAL_OUT   evaluation folder (default OUT/eval, the table in OUT/study.md; given: reports in
#              EVAL_OUT/seed<N>/, the table in EVAL_OUT/study.md), so that an evaluation of other
#              variants in the same OUT keeps the earlier one
#   EVAL_OVERRIDES space-separated Hydra overrides added to every evaluate.py call (e.g.
#              "shared_content.segments=8" for a quicker shared-content comparison)
#   EQUAL_BITRATE 1 (default): also train, per seed, `mono_nq1` (config_mono_nq2 with
#              model.n_q=1: a codec at one codebook's bitrate, trained so) and give it to that
#              seed's evaluation (shared_content.equal_bitrate_checkpoint): shared-content
#              coding against independent coding at about its bitrate; 0: skip it; a variant
#              NAME: that variant's checkpoint of each seed instead (trained too if it is not
#              in VARIANTS), e.g. `mono` for three-codebook recipes, whose shared-content
#              coding of 32 channels sends 65 streams where `mono` codes them with 64
#   TRAIN_ONLY 1: train (or reuse) the runs and stop before the evaluation
#   JOBS       training runs at once (default 1; on 2 CPU cores 2 runs of one thread each
#              finish sooner than one after the other). Each run's console is appended to
#              OUT/<variant>/seed<N>/console.log.
# Duration on 2 CPU cores: see docs/study.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
out="$(mkdir -p "${OUT:-$here/runs/paired_study}" && cd "${OUT:-$here/runs/paired_study}" && pwd)"
seeds="${SEEDS:-3}"
first_seed="${FIRST_SEED:-1}"
seed_list="$(seq "$first_seed" $(( first_seed + seeds - 1 )))"
variants="${VARIANTS:-mono mono_split seed rvq xrec scc cons paired}"
steps="${STEPS:-800}"
start="${START:-$here/pretrained/start_demo.pt}"
[ -f "$start" ] || {
  echo "no starting point at $start: run scripts/pretrain_start.sh" >&2
  exit 1
}
export SYNTH_FILES="${SYNTH_FILES:-12}"
if [ -n "${DATA_ROOT:-}" ]; then data="$DATA_ROOT"; else data="$out/data"; synth_set "$data"; fi
per_epoch=100
epochs=$(( (steps + per_epoch - 1) / per_epoch ))

paired_content_share() {  # the split of config_paired_nq2, for its mono baseline
  sed -n 's/^ *content_share: *\([0-9.]*\).*/\1/p' "$here/config/config_paired_nq2.yaml"
}
batch="$(sed -n 's/^ *batch_size: *\([0-9]*\).*/\1/p' "$here/config/preset/demo.yaml")"

train() {  # train VARIANT SEED
  local variant="$1" seed="$2" dir="$out/$1/seed$2"
  local script=train_paired_gpu.py config=config_paired_nq2 recipe=()
  case "$variant" in
    mono) script=train_single_gpu.py; config=config_mono_nq2 ;;
    mono_split) script=train_single_gpu.py; config=config_mono_nq2
                recipe=("model.content_share=$(paired_content_share)") ;;
    seed) recipe=(pairwise=seed model.content_share=0) ;;
    rvq) recipe=(model.content_share=0 pairwise.shared_content_code=false) ;;
    xrec) recipe=(pairwise.shared_content_code=false pairwise.consensus_weight=0
                  pairwise.xrec_weight=1 pairwise.ild_head.enabled=false) ;;
    xrec0) recipe=(pairwise.shared_content_code=false pairwise.consensus_weight=0
                   pairwise.xrec_weight=0 pairwise.ild_head.enabled=false) ;;
    scc) recipe=(pairwise.consensus_weight=0 pairwise.ild_head.enabled=false) ;;
    cons) recipe=(pairwise.ild_head.enabled=false) ;;
    paired) ;;
    *:*) IFS=, read -r -a recipe <<< "${variant#*:}"; variant="${variant%%:*}"
         dir="$out/$variant/seed$seed"
         if [ "${recipe[0]:-}" = mono ]; then
           script=train_single_gpu.py; config=config_mono_nq2; recipe=("${recipe[@]:1}")
         fi ;;
    *) echo "unknown variant '$variant' in VARIANTS (use mono, mono_split, seed, rvq, xrec," \
            "xrec0, scc, cons, paired or NAME:OVERRIDES)" >&2
       exit 2 ;;
  esac
  # Equal segments per step: a mono item is one segment, a paired item two.
  local items=$batch
  [ "$script" = train_single_gpu.py ] && items=$(( 2 * batch ))
  if latest_checkpoint "$dir" >/dev/null 2>&1 && [ -f "$dir/.complete" ]; then
    phase "$variant seed $seed: done before, reused"; return
  fi
  phase "training $variant, seed $seed ($steps steps from $(basename "$start"))"
  "$py" "$here/$script" --config-name="$config" +preset=demo "${recipe[@]}" \
    "model.init_from=$start" "datasets.data_root=$data" "common.seed=$seed" \
    "common.max_epoch=$epochs" "datasets.batch_size=$items" \
    "datasets.fixed_length=$(( per_epoch * items ))" datasets.val_files=monitor \
    "common.max_steps_per_epoch=$per_epoch" "common.val_interval=$epochs" \
    "common.save_interval=$epochs" discriminator.start_epoch=1 checkpoint.keep_last=1 \
    "common.device=${DEVICE:-cpu}" "wandb.mode=${WANDB:-disabled}" checkpoint.resume=true \
    "checkpoint.save_folder=$dir" "hydra.run.dir=$dir/hydra"
  touch "$dir/.complete"
}

trained="$variants"
case "${EQUAL_BITRATE:-1}" in
  0) equal_variant= ;;
  1) equal_variant=mono_nq1; trained="$trained mono_nq1:mono,model.n_q=1" ;;
  *) equal_variant="$EQUAL_BITRATE"
     [[ " $trained " == *" $equal_variant "* ]] || trained="$trained $equal_variant" ;;
esac

jobs="${JOBS:-1}"
run_all() {  # every (seed, variant) run, at most JOBS at once; stops at the first failure
  local running=0 seed variant log
  for seed in $seed_list; do
    for variant in $trained; do
      if [ "$jobs" -le 1 ]; then train "$variant" "$seed"; continue; fi
      local log="$out/${variant%%:*}/seed$seed/console.log"
      mkdir -p "$(dirname "$log")"
      phase "started ${variant%%:*}, seed $seed (console: $log)"
      train "$variant" "$seed" >> "$log" 2>&1 &
      running=$(( running + 1 ))
      if [ "$running" -ge "$jobs" ]; then
        wait -n || { echo "a training run failed: see $out/*/seed*/console.log" >&2; exit 1; }
        running=$(( running - 1 ))
      fi
    done
  done
  while [ "$running" -gt 0 ]; do
    wait -n || { echo "a training run failed: see $out/*/seed*/console.log" >&2; exit 1; }
    running=$(( running - 1 ))
  done
}
if [ "$jobs" -gt 1 ]; then export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; fi
run_all
if [ "${TRAIN_ONLY:-0}" = 1 ]; then phase "trained (TRAIN_ONLY=1): evaluation skipped"; exit 0; fi

reports=()
eval_out="${EVAL_OUT:-$out/eval}"; mkdir -p "$eval_out"
for seed in $seed_list; do
  ckpts=(); labels=()
  for variant in $variants; do
    name="${variant%%:*}"
    ckpts+=("'$(latest_checkpoint "$out/$name/seed$seed")'"); labels+=("$name")
  done
  equal=()
  if [ -n "$equal_variant" ]; then
    equal_ckpt="$(latest_checkpoint "$out/$equal_variant/seed$seed")"
    equal=("shared_content.equal_bitrate_checkpoint='$equal_ckpt'")
  fi
  phase "evaluating seed $seed (${labels[*]})"
  "$py" "$here/evaluate.py" "checkpoints=[$(IFS=,; echo "${ckpts[*]}")]" "${equal[@]}" \
    "labels=[$(IFS=,; echo "${labels[*]}")]" "datasets.data_root=$data" \
    "datasets.val_pairs=${EVAL_PAIRS:-256}" "out_dir=$eval_out/seed$seed" "device=${DEVICE:-cpu}" \
    ${EVAL_OVERRIDES:-}
  reports+=("$eval_out/seed$seed/metrics.json")
done
phase "table over $seeds seed(s)"
table="${EVAL_OUT:+$eval_out/study.md}"
"$py" "$here/scripts/study_table.py" "${reports[@]}" | tee "${table:-$out/study.md}"
phase "done"
cat <<EOF2
Where things are (under $out):
  data/                          synthetic em32 scene set (32 ch, 48 kHz) and its 24 kHz arrays
  <variant>/seed<N>/             checkpoints (ckpt_*.pt, best.pt) of each run
  <variant>/seed<N>/audio/       validation inputs and reconstructions (WAV)
  <variant>/seed<N>/hydra/       train.log and the resolved config
  <variant>/seed<N>/wandb/       wandb run files (WANDB=offline; sync with 'wandb sync')
  eval/seed<N>/                  metrics.json, report.md and plots: the variants side by side
  study.md                       the table above (mean +- std over seeds)
EOF2
