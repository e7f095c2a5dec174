# fedclinic: `make demo` runs the main job, `make test` runs the tests. Both set up everything they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedclinic-installed
BUILD ?= build

# One thread per process: two OpenMP threads on a busy 2-core box collapse (ENVIRONMENT.md).
export OMP_NUM_THREADS := 1
# dcmtk and Orthanc honour this; without it every C-STORE stalls on Nagle + delayed ACK.
export TCP_NODELAY := 1
export FEDCLINIC_DATA ?= $(abspath ../shared/data)
export PYTHONUNBUFFERED := 1

APT_PACKAGES := dcmtk orthanc dicom3tools

.PHONY: help system venv lint test test-bundle demo bench clean

help:
	@echo "make demo   - set up, then run a hub + clinic nodes + PACS on real data and print the results"
	@echo "make test   - set up, then run lint, type checks, import contracts and the test suite"
	@echo "make bench  - run the benchmarks in bench/ (figures go to docs/benchmarks.md by hand)"

# System packages (Debian/Ubuntu): dcmtk for the DICOM tools, Orthanc as the clinic PACS, dicom3tools to validate results.
system:
	@if command -v storescu >/dev/null && command -v Orthanc >/dev/null && command -v dciodvfy >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	else echo "Need $(APT_PACKAGES): run 'sudo apt-get install $(APT_PACKAGES)' or run make as root" >&2; exit 1; fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[edge,cpu,hub,dev]'
	touch $@

venv: $(STAMP)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# A real student trained on PneumoniaMNIST, exported and signed: the bundle the edge tests load.
test-bundle: venv
	$(PY) -m tests.support.bundle $(BUILD)/test-bundle

test: system venv lint test-bundle
	FEDCLINIC_TEST_BUNDLE=$(abspath $(BUILD)/test-bundle) $(PY) -m pytest

demo: system venv
	$(VENV)/bin/fedclinic-hub demo --workdir $(BUILD)/demo

bench: system venv test-bundle
	FEDCLINIC_TEST_BUNDLE=$(abspath $(BUILD)/test-bundle) $(PY) bench/bench_inference.py
	FEDCLINIC_TEST_BUNDLE=$(abspath $(BUILD)/test-bundle) $(PY) bench/bench_ingest.py
	FEDCLINIC_TEST_BUNDLE=$(abspath $(BUILD)/test-bundle) $(PY) bench/bench_e2e.py

clean:
	rm -rf $(BUILD) .pytest_cache .mypy_cache .ruff_cache
