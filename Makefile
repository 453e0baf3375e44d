# Two commands on a fresh machine: `make demo` and `make test` (each creates .venv if missing).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The quiet process environment (no telemetry, offline hub, ...) is set by the code itself
# (pipelines/environment.py); the Makefile only keeps temp files inside the project.
# The CPU build of torch lies on disk here; on CUDA machines set TORCH_SPEC to the wheel you want.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-cluster test-resume test-workflow test-fast bench golden lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt $(TORCH_SPEC)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	mkdir -p runs/demo/tmp
	TMPDIR=$(CURDIR)/runs/demo/tmp $(VENV)/bin/qwenflux demo --config pipelines/configs/tiny.toml

# Every test but three suites that .ci/run runs after it: `cluster` (a real two-process Ray
# cluster, MLflow and S3 servers on 127.0.0.1; make test-cluster), `resume` (trainings
# SIGKILLed mid-stage and resumed on two workers and on one; make test-resume) and `workflow`
# (whole workflows killed inside every step and refreshed with a new url list; make test-workflow).
test: $(STAMP)
	mkdir -p .tmp
	$(VENV)/bin/ruff check pipelines components model tests
	TMPDIR=$(CURDIR)/.tmp $(PY) -m pytest -q -m "not cluster and not workflow and not resume" tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests selected"; rc=0; fi; exit $$rc

test-cluster: $(STAMP)
	mkdir -p .tmp
	TMPDIR=$(CURDIR)/.tmp $(PY) -m pytest -q -m cluster tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests selected"; rc=0; fi; exit $$rc

test-resume: $(STAMP)
	mkdir -p .tmp
	TMPDIR=$(CURDIR)/.tmp $(PY) -m pytest -q -m resume tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests selected"; rc=0; fi; exit $$rc

test-workflow: $(STAMP)
	mkdir -p .tmp
	TMPDIR=$(CURDIR)/.tmp $(PY) -m pytest -q -m workflow tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests selected"; rc=0; fi; exit $$rc

test-fast: $(STAMP)
	mkdir -p .tmp
	TMPDIR=$(CURDIR)/.tmp $(PY) -m pytest -q -m "not slow and not integration" tests; \
	  rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

bench: $(STAMP)
	mkdir -p .tmp
	TMPDIR=$(CURDIR)/.tmp $(PY) tests/benchmarks/bench_data.py
	TMPDIR=$(CURDIR)/.tmp $(PY) tests/benchmarks/bench_train.py --block-smoke

# Regenerates the training loop's golden per-step losses: only for a change meant to move them.
golden: $(STAMP)
	mkdir -p .tmp
	TMPDIR=$(CURDIR)/.tmp $(PY) tests/golden_losses.py --write

lint: $(STAMP)
	$(VENV)/bin/ruff check pipelines components model tests

clean:
	rm -rf runs .tmp .pytest_cache
