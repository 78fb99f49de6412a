# `make demo` and `make test` do all set-up themselves (scripts/install.sh, once per checkout).
PYTHON ?= python

.PHONY: install demo report test test-fast bench quality style

.installed: setup.cfg pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) bash scripts/install.sh

install: .installed

# The main job: the detox recipe on the embedded SmolLM2-135M-Instruct (about 11 minutes on 2 CPU cores).
demo: .installed
	$(PYTHON) -m hf_lrp_surgery.cli detox --output runs/detox

report: .installed
	$(PYTHON) -m hf_lrp_surgery.cli report --output runs/report

# Tests never use the network: HF_HUB_OFFLINE makes any accidental Hub call fail at once.
test: .installed
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q

test-fast: .installed
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -m "not e2e"

# Lint, format check and type check (ruff and mypy, configured in pyproject.toml); `make style` fixes what ruff can.
QUALITY_PATHS = hf_lrp_surgery tests recipes benchmarks scripts

quality: .installed
	$(PYTHON) -m ruff check $(QUALITY_PATHS)
	$(PYTHON) -m ruff format --check $(QUALITY_PATHS)
	$(PYTHON) -m mypy

style: .installed
	$(PYTHON) -m ruff check --fix $(QUALITY_PATHS)
	$(PYTHON) -m ruff format $(QUALITY_PATHS)

bench: .installed
	$(PYTHON) benchmarks/relevance_speed.py
