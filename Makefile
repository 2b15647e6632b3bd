# README's two commands: `make demo` and `make test`. Both create and reuse .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv demo test test-all bench gpu-check lint clean

venv: $(STAMP)

# Re-install only when pyproject.toml changes. torch's range picks the local CPU wheel here;
# on a GPU machine install your CUDA torch into .venv first and it is kept.
# .ci/constraints.txt pins the tested set of every dependency but torch (see its header).
$(STAMP): pyproject.toml .ci/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c .ci/constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(BIN)/temper validate jobs/quickstart.yaml
	$(BIN)/temper run jobs/quickstart.yaml
	@echo ""
	@echo "The run is recorded in MLflow. Browse it with:"
	@echo "  $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db"

# Fast tiers (unit, distributed, integration); `make test-all` adds slow-marked tests.
# pytest's exit code 5 (no tests collected) is a failure, not a pass.
test: venv
	@$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

test-all: venv
	@$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

# On a CUDA machine, in the Python environment that has CUDA torch (no Ray needed, no venv made).
gpu-check:
	benchmarks/gpu_check.sh

bench: venv
	$(BIN)/python benchmarks/loop_overhead.py
	$(BIN)/python benchmarks/tracking_overhead.py
	$(BIN)/python benchmarks/data_loader.py --http
	$(BIN)/python benchmarks/strategy_memory.py
	$(BIN)/python benchmarks/checkpoint_save.py

lint: venv
	$(BIN)/ruff check platform tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .temper
