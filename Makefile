# `make demo` and `make test` do all set-up themselves (scripts/install.sh, once per checkout).
PYTHON ?= python

.PHONY: install demo report test test-fast bench

.installed: setup.cfg pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) bash scripts/install.sh

install: .installed

# The main job: the detox recipe on the embedded SmolLM2-135M-Instruct (about 5 minutes on 2 CPU cores).
demo: .installed
	$(PYTHON) -m hf_lrp_surgery.cli detox --output runs/detox

report: .installed
	$(PYTHON) -m hf_lrp_surgery.cli report --output runs/report

# Tests never use the network: HF_HUB_OFFLINE makes any accidental Hub call fail at once.
test: .installed
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q

test-fast: .installed
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -m "not e2e"

bench: .installed
	$(PYTHON) benchmarks/relevance_speed.py
