#!/usr/bin/env bash
# Paired-channel training.
#   EIGENSCAPE_ROOT=/data/eigenscape ./train_paired.sh [hydra overrides...]
#   NPROC=4 EIGENSCAPE_ROOT=... ./train_paired.sh datasets.batch_size=16   # 4 GPUs via torchrun
exec bash "$(dirname "$0")/scripts/launch.sh" train_paired_gpu.py config_paired_nq2 "$@"
