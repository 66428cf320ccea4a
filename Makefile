# Two commands for users: `make demo` and `make test`. Both set up .venv first; all targets are safe to rerun.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned to the local CPU wheel: an unpinned torch pulls several GB of CUDA packages.
TORCH := torch==2.13.0

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH) -e ".[dev,tools]"
	@touch $(STAMP)

demo: setup
	@echo "== PyTorch reference: tiny-random-llava (random weights), 16 of 64 visual tokens kept =="
	$(PY) -m covipal covipal/assets/shapes.png "What is on the table?" --model tiny-random-llava \
		--strategy text-sim --budget 16 --max-new-tokens 12
	@echo "== ONNX export (export.py) and the runtime (run_trt.py): not available yet =="

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
