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

APT_PACKAGES := dcmtk orthanc systemd postgresql chromium chromium-driver dicom3tools curl jq

.PHONY: help system venv lint test test-bundle demo bench clean

help:
	@echo "make demo   - set up, then run a hub + clinic nodes + PACS on real data and print the results"
	@echo "make test   - set up, then run lint, type checks, import contracts and the test suite"
	@echo "make bench  - run the benchmarks in bench/ (figures go to docs/benchmarks.md by hand)"

# System packages (Debian/Ubuntu): dcmtk for the DICOM tools, Orthanc as the clinic PACS, systemd for
# systemd-analyze (the installer's unit is verified with it; systemd need not run), PostgreSQL (the hub's
# production store; tests start a throwaway cluster), Chromium and its WebDriver (browser tests of the web pages),
# dicom3tools (dciodvfy validates every SR and SC the node sends), curl and jq (the README's federation example).
# Each is looked for by a file it installs.
SYSTEM_PROBES := /usr/bin/storescu /usr/sbin/Orthanc /usr/bin/systemd-analyze /usr/bin/chromium /usr/bin/chromedriver \
	/usr/bin/dciodvfy /usr/lib/postgresql/*/bin/pg_ctl /usr/bin/curl /usr/bin/jq
system:
	@missing=0; for f in $(SYSTEM_PROBES); do [ -e "$$f" ] || missing=1; done; \
	if [ $$missing = 0 ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	else echo "Need $(APT_PACKAGES): run 'sudo apt-get install $(APT_PACKAGES)' or run make as root" >&2; exit 1; fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[edge,cpu,hub,lab,dev]'
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

# Two pytest workers: much of the suite waits on processes, sockets and disks, so on a 2-core box two cut the
# suite from about 38 to about 25-30 minutes; worksteal lets a free worker take tests queued behind a long e2e
# test. Every test takes its own ports and folders. TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
test: system venv lint test-bundle
	FEDCLINIC_TEST_BUNDLE=$(abspath $(BUILD)/test-bundle) $(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal

demo: system venv
	$(VENV)/bin/fedclinic-lab demo --workdir $(BUILD)/demo

bench: system venv test-bundle
	FEDCLINIC_TEST_BUNDLE=$(abspath $(BUILD)/test-bundle) $(PY) bench/bench_inference.py
	FEDCLINIC_TEST_BUNDLE=$(abspath $(BUILD)/test-bundle) $(PY) bench/bench_ingest.py
	FEDCLINIC_TEST_BUNDLE=$(abspath $(BUILD)/test-bundle) $(PY) bench/bench_e2e.py

clean:
	rm -rf $(BUILD) .pytest_cache .mypy_cache .ruff_cache
