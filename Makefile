# Two commands for a newcomer: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test demo bench

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q tests

# A few minutes on 2 CPU cores: a small synthetic scene set, mono (EnCodec's quantizer and the
# split one of the paired default) and paired fine-tuned from the common starting point
# (pretrained/start_demo.pt), evaluated side by side; then one line of the starting point beside
# the official EnCodec model on a real speech clip, when ENCODEC_ANCHOR (or the shared fixtures)
# holds it.
demo: venv
	OUT=runs/demo SEEDS=1 VARIANTS="mono mono_split paired" STEPS=200 EVAL_PAIRS=64 \
	SYNTH_FILES=2 JOBS=2 SYNTH_SECONDS=20 WANDB=offline EQUAL_BITRATE=0 \
	EVAL_OVERRIDES="shared_content.segments=8" bash scripts/paired_study.sh
	$(PY) scripts/anchor_check.py --checkpoint pretrained/start_demo.pt

bench: venv
	$(PY) bench/step_time.py
