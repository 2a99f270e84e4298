# Two entry points for a fresh machine: `make train` and `make test`.
# `make train` installs only what training needs (fast on a fresh machine); `make test` adds the dev extras
# (transformers, lm-eval, sentencepiece, ...) on top of the same .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORE := $(VENV)/.installed-core
DEV := $(VENV)/.installed-dev

.PHONY: train test test-fast lint install clean gpu-check bench

$(CORE): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: anything looser lets another requirement pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $(CORE)

$(DEV): $(CORE)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(DEV)

install: $(DEV)

train: $(CORE)
	$(BIN)/neox prepare stdlib --out data/stdlib
	$(BIN)/neox tokenizer train data/stdlib/stdlib.jsonl --vocab-size 4096 --out data/stdlib/tokenizer.json
	$(BIN)/neox preprocess --input data/stdlib/stdlib.jsonl --tokenizer-type HFTokenizer \
		--vocab-file data/stdlib/tokenizer.json --append-eod --output-prefix data/stdlib/stdlib --workers 2
	# load = save: the first `make train` starts from scratch, a second one resumes the finished run (nothing to
	# train; it is kept as it was) or continues it after train_iters was raised in the config.
	$(BIN)/neox train configs/tiny-cpu.yml --set load=runs/tiny-cpu
	$(BIN)/neox generate runs/tiny-cpu --prompt "def " --max-new-tokens 64 --num-samples 2 --temperature 0.8 --top-p 0.95

# ruff (lint, import order, formatting) and import-linter (the layers contract in pyproject.toml)
lint: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# --durations=30: the slowest tests end every CI log, so that the suite's 20-minute budget on 2 cores can be watched
test: $(DEV) lint
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q --timeout 900 --durations=30 $(PYTEST_ARGS)

test-fast: $(DEV)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# one GPU, under 8 minutes: environment, pytest -m cuda, fp32/bf16/fp16 runs with resume, host syncs, attention
# backends, pythia-160m throughput against transformers, eager vs compiled generation, two-rank layouts
# (bench/gpu_check.py; --cpu is its smoke mode). The table prints as it runs; the JSON report is runs/gpu-check.json.
gpu-check: $(DEV)
	$(BIN)/python bench/gpu_check.py --out runs/gpu-check.json $(GPU_CHECK_ARGS)

# neox beside transformers on this machine: training (pythia 14m-410m shapes), generation (batch 1 and 8),
# preprocessing (against the raw tokenizer) and start-up, each engine in its own process, alternating over
# rounds, load recorded. The table prints; the JSON report is runs/bench.json. BENCH_ARGS="--quick" smoke-tests.
bench: $(DEV)
	$(BIN)/neox bench --out runs/bench.json $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs data
