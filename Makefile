# The commands the README names. `make test` and `make demo` create .venv when no virtual
# environment is active, and install the project into it.
PY ?= python3
VENV := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
BIN := $(VENV)/bin
PROMPT ?= a purple triangle moving up on a white background

.PHONY: install demo test test-fast protos lint train train-adapter eval eval-qc bench bench-ray bench-replicas reliability

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0 -e '.[dev]'

demo: install
	$(BIN)/videomesh demo "$(PROMPT)" --out clip.mp4

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

protos:
	$(BIN)/python scripts/gen_protos.py

# Reproduce the shipped weights from scratch (resumable: rerun to continue from checkpoints/).
train: install
	$(BIN)/videomesh train

# Prompt adherence on held-out phrasings, through the real mesh; prints the model-card table and
# saves every row beside the weights it measured (a test checks the saved file is of those weights).
eval: install
	$(BIN)/videomesh eval --json services/denoiser/weights/default.eval.json

# Performance ratios (issue #20), every comparison interleaved in one run: mesh vs in-process, 8
# concurrent vs sequential and the CPU limit, stage times, denoiser FLOP/s vs GEMM, step caching, tiny
# Wan vs WanPipeline; prints a table and writes bench.json. `videomesh bench --quick` for a short run.
bench: install
	$(BIN)/videomesh bench --json bench.json

# The denoiser's Ray throughput figures: batching/pipelining vs one at a time; bf16 vs fp32.
bench-ray: install
	$(BIN)/python -m services.denoiser.bench

# Gateway replicas on one PostgreSQL: CreateVideo p50/p99 and jobs/s with 1, 2, 3 replicas; lease takeover.
bench-replicas: install
	$(BIN)/python scripts/bench_replicas.py

# The shipped brand style adapter (LoRA) on the frozen default model, then its evaluation.
train-adapter: install
	$(BIN)/videomesh train-adapter

# The upscaler's super-resolution network, then its evaluation table.
train-upscaler: install
	$(BIN)/python -m services.upscaler.train

eval-upscaler: install
	$(BIN)/python -m services.upscaler.evaluate

# Precision/recall of every quality check on a generated, labelled suite (+ throughput).
eval-qc: install
	$(BIN)/python -m services.qc.calibrate

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# The reliability suite (issue #22): load, faults (SIGKILL each service, S3 down, gateway restart, a replica
# killed), fuzz (1,000 examples per RPC and kind) and security against a real supervised mesh with two
# replicas; prints the tables, writes reliability.json, exits 1 if anything was lost, duplicated, INTERNAL
# or let through. `python scripts/reliability.py --quick` for the short run CI makes.
reliability: install
	$(BIN)/python scripts/reliability.py --json reliability.json
