# The README's two commands: `make demo` and `make test`. Both do the whole set-up.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup demo test test-fast lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch: the CPU build 2.13.0 when none is importable (never a bare `torch`: that is a
# multi-GB CUDA download).
setup: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,bench,peers]"
	@if [ ! -f $(FMNIST) ] && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -q && apt-get install -y -q dataset-fashion-mnist) >/dev/null 2>&1 \
		|| echo "note: could not install dataset-fashion-mnist; Fashion-MNIST runs will say how to get it"; \
	fi

demo: setup
	$(PY) -m natgrad.demo

test: setup
	$(PY) -m pytest

# The inner loop: everything but the tests marked slow (spawned workers, end-to-end runs).
test-fast: setup
	$(PY) -m pytest -m "not slow"

lint: setup
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check src tests benchmarks

bench: setup
	$(PY) benchmarks/step_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
