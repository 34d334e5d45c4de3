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

# A few minutes on 2 CPU cores: synthetic data, paired + mono training, evaluation.
demo: venv
	EPOCHS=2 STEPS=200 EVAL_PAIRS=0 WANDB=offline bash scripts/mini_experiment.sh runs/demo

bench: venv
	$(PY) bench/step_time.py
