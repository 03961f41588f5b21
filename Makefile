# Everything runs in .venv at the repository root, created on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO := .cache/demo

.PHONY: setup demo demo-jobs test test-unit soak bench clean

setup: $(STAMP)

# torch is pinned to 2.13.0 (the local CPU wheel) and installed first, so nothing pulls a CUDA
# build. DeepSpeed builds no ops (DS_BUILD_OPS=0) and needs the installed torch at build time,
# hence --no-build-isolation. Exact versions come from requirements/constraints.txt.
$(STAMP): pyproject.toml requirements/constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or: make PYTHON=python3)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --no-build-isolation -c requirements/constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	scripts/demo.sh

# The jobs alone, without the service: what `ray job submit` runs.
demo-jobs: $(STAMP)
	$(PY) -m jobs.scaffold_model $(DEMO)/tiny-model
	$(PY) -m jobs.prepare --spec configs/datasets/demo.yaml
	rm -rf $(DEMO)/checkpoints/cpu-smoke  # a fresh run each time (the same name would resume)
	$(PY) -m jobs.train --spec configs/training/cpu-smoke.yaml

# Unit, integration and deployment tests (pyproject's testpaths): under 15 minutes on 2 cores.
test: $(STAMP)
	$(VENV)/bin/ruff check jobs service tests benchmarks
	$(PY) -m pytest -q

test-unit: $(STAMP)
	$(PY) -m pytest -q -m "not integration and not gpu"

# The 50-job soak against the service on a real local Ray (about 4 minutes, CPU pinning).
soak: $(STAMP)
	$(PY) -m pytest -q tests/soak

bench: $(STAMP)
	$(PY) benchmarks/prepare.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/api.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
