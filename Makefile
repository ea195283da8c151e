# make setup  - virtual environment in .venv, requirements, and the offline assets in $IGF_CACHE_DIR (~/.cache/igf)
# make run    - setup, then the offline default experiment (extra flags: make run ARGS="--num_runs 5")
# make test   - the test suite (tiny random models; the real-model checks run once the assets are cached)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test clean
setup: $(VENV)/.installed
	$(PY) -m igf.assets

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

run: setup
	$(PY) run_clm_igf.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) output
