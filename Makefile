# megatron-triton: `make serve` and `make test` work from a fresh clone (they set up .venv and the demo model).
PYTHON_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := demo_model

# Serving configuration, read by triton_backend/config.py (see README "Configuration").
TP ?= 1
PP ?= 1
export TP PP EP PP_MICROBATCHES PP_LAYERS NNODES NODE_RANK MASTER_ADDR MASTER_PORT CHECKPOINT TOKENIZER TOKENIZER_TYPE DEVICE DTYPE HOST HTTP_PORT GRPC_PORT METRICS_PORT INSTANCES MAX_SLOTS \
       MAX_BATCH_SIZE MAX_QUEUE MAX_REQUEST_S DRAIN_TIMEOUT_S ADMIN_TOKEN LOG_VERBOSE COLLECTIVE_TIMEOUT_S LOAD_TIMEOUT_S \
       KV_CACHE_MB PREFIX_CACHING COMPILE CUDA_GRAPHS ATTENTION PREFILL_TOKENS TORCH_THREADS PIN_ENGINE STREAM_RESPONSES_PER_S \
       API API_PORT API_KEY CHAT_TEMPLATE MODEL_NAME

.PHONY: serve test unit functional lint bench bench-attention bench-cache bench-pp bench-nodes bench-api bench-engine bench-guided bench-genai-perf soak fuzz mutate demo-model setup system-deps clean

serve: setup demo-model
	$(PY) -m triton_backend.launch

test: setup demo-model
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests

unit: setup
	$(PY) -m pytest tests/unit

functional: setup demo-model
	$(PY) -m pytest tests/functional

# tools/bench.py --peer runs transformers' generate() on the same weights beside the served run (benchmark-only).
bench: setup demo-model $(VENV)/.bench-installed
	$(PY) tools/bench.py --peer
	$(PY) tools/bench_cache.py
	$(PY) tools/bench_api.py

bench-api: setup demo-model
	$(PY) tools/bench_api.py

# The engine against transformers' generate() on the same weights, in one torchrun process: the demo model and a
# random-init gpt-350m (written once to results/gpt-350m). transformers is a benchmark-only dependency.
# Options go in BENCH_ENGINE_ARGS, e.g. "--models demo" or "--big-batch 1 16 64" (see tools/bench_engine.py).
BENCH_ENGINE_ARGS ?=
bench-engine: setup demo-model $(VENV)/.bench-installed
	$(VENV)/bin/torchrun --standalone --nproc-per-node 1 -m tools.bench_engine $(BENCH_ENGINE_ARGS)

# Decode attention's bytes moved per step against the KV bytes it must read, the CUDA graphs' path counted from its
# own operations on meta tensors, and the CPU kernel's (tools/bench_attention.py; no GPU needed).
bench-attention: setup
	$(PY) tools/bench_attention.py

# Pipeline stages in-process: batches in flight against one at a time, resident weights per rank (gpt-350m).
bench-pp: setup demo-model $(VENV)/.bench-installed
	$(PY) tools/bench_pp.py

# Structured outputs in-process: a 20-property schema's compile time, guided against unguided streams in one run.
# Options go in BENCH_GUIDED_ARGS, e.g. "--seconds 60" (see tools/bench_guided.py); CHECKPOINT picks the model.
BENCH_GUIDED_ARGS ?=
bench-guided: setup demo-model
	$(VENV)/bin/torchrun --standalone --nproc-per-node 1 -m tools.bench_guided $(BENCH_GUIDED_ARGS)

# Two pipeline stages served on one node against the same on two nodes (network namespaces; needs root).
bench-nodes: setup demo-model
	$(PY) tools/bench_nodes.py

$(VENV)/.bench-installed: requirements-bench.txt $(VENV)/.installed
	$(PY) -m pip install --quiet -r requirements-bench.txt
	touch $@

# genai-perf against the streaming ensemble and the OpenAI routes; it lives in a venv of its own (see the script).
GENAI_VENV := .venv-genai-perf
bench-genai-perf: setup demo-model $(GENAI_VENV)/.installed
	$(PY) tools/genai_perf.py

$(GENAI_VENV)/.installed: requirements-genai-perf.txt
	test -x $(GENAI_VENV)/bin/python || $(PYTHON_SYS) -m venv $(GENAI_VENV)
	$(GENAI_VENV)/bin/pip install --quiet -r requirements-genai-perf.txt
	touch $@

# The paged KV cache's figures alone (in-process, `long` preset): capacity, prefix caching, chunked prefill.
bench-cache: setup
	$(PY) tools/bench_cache.py

# Long runs, kept out of `make test` (which runs short versions of both).
SOAK_REQUESTS ?= 5000
soak: setup demo-model
	$(PY) tools/soak.py --requests $(SOAK_REQUESTS) --concurrency 64 --cancel-share 0.1 --tp $(TP)

FUZZ_EXAMPLES ?= 2000
fuzz: setup demo-model
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -s tests/functional/test_fuzz.py

# Mutation testing (mutmut, configured in pyproject.toml): mutants of the engine, cache, attention and sampling
# against the fast unit tests; prints the share killed and lists the survivors (see docs/testing.md). One torch
# thread per mutant: two mutants at once on two cores (with torch's default threads a run went at half the pace).
mutate: setup
	rm -rf mutants
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2 >/dev/null 2>mutants.log || { tail -20 mutants.log; exit 1; }
	$(VENV)/bin/mutmut export-cicd-stats
	$(PY) tools/mutation_score.py

lint: setup
	$(VENV)/bin/ruff check .

setup: $(VENV)/.installed system-deps

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# perf_analyzer (tritonclient's wheel) needs libb64 from Debian; the CPU kernels (decode attention, rotary,
# sampling) a C compiler (triton_backend/native.py; without one the slower torch operations serve).
system-deps:
	@ldconfig -p | grep -q libb64.so.0d || { \
	  echo "installing libb64-0d (needed by perf_analyzer)"; \
	  apt-get update -qq && apt-get install -y -qq libb64-0d >/dev/null; }
	@command -v cc >/dev/null || command -v gcc >/dev/null || { \
	  echo "installing gcc (builds the CPU kernels)"; \
	  apt-get update -qq && apt-get install -y -qq gcc libc6-dev >/dev/null; }

demo-model: $(DEMO)/checkpoint/latest_checkpointed_iteration.txt

$(DEMO)/checkpoint/latest_checkpointed_iteration.txt: | $(VENV)/.installed
	$(PY) -m tools.demo_model --out $(DEMO)

clean:
	rm -rf $(DEMO) .pytest_cache mutants mutants.log
