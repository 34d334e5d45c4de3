#!/usr/bin/env bash
# Mono (baseline) training.
#   EIGENSCAPE_ROOT=/data/eigenscape ./run_training.sh [hydra overrides...]
#   NPROC=4 EIGENSCAPE_ROOT=... ./run_training.sh                          # 4 GPUs via torchrun
exec bash "$(dirname "$0")/scripts/launch.sh" train_single_gpu.py config_mono_nq2 "$@"
