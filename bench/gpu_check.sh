#!/usr/bin/env bash
# The training step on one GPU: float32 (TF32) vs bf16 vs bf16 + torch.compile, at batch 8 and
# 32 x 1 s, paired and mono (the same segments), full paired config: ms/step, segments/s and
# peak GPU memory, printed as a table (bench/gpu_check.py), after a check of one GPU step
# against the straightforward step of tests/reference_step.py. Under 8 minutes on one H200
# (no configuration starts after 330 s; a hard limit of 470 s).
#
# NOT RUN YET: the session that wrote it had no GPU. To run it from a session that has one:
# the device image has torch and torchaudio but not hydra-core / omegaconf, so first, here, in
# the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps -d .whl hydra-core==1.3.2 omegaconf==2.3.0
#   python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
# then run `bash bench/gpu_check.sh` on the device with carry [".whl"]; the table and a JSON
# copy land in $OUT (or /tmp/gpu_check). Put the numbers in docs/benchmarks.md ("GPU check").
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import hydra, omegaconf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 timeout 470 python3 bench/gpu_check.py --budget 330 --json "$out/gpu_check.json" \
  2>&1 | tee "$out/gpu_check.log"
