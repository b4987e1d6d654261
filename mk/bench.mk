# Benchmark targets (server/bench). Included by the main Makefile, which defines PY, PIP, VENV.
# The `bench` extra (sacrebleu, matplotlib) is installed for `make bench` and for the tests.

BENCH_PROMPTS ?= ../shared/data/spec_bench/question.jsonl
BENCH_CATEGORIES ?= mt_bench,translation,summarization,qa,math_reasoning,rag
BENCH_LIMIT ?= 2
BENCH_MAX_TOKENS ?= 64
BENCH_PEERS ?= hf,hf_pld,vllm,vllm_ngram,vllm_three_tier,llamacpp,llamacpp_pld
BENCH_OUT ?= benchmarks/results

.PHONY: bench-install bench-quick bench-sweep bench-load

$(VENV)/.installed-bench: $(VENV)/.installed pyproject.toml
	$(PIP) install --cache-dir $(PIP_CACHE) -q -e '.[bench]'
	touch $@

bench-install: $(VENV)/.installed-bench

# extra prerequisites of the main Makefile's targets: plots and BLEU need the extra
bench: $(VENV)/.installed-bench
install-test: $(VENV)/.installed-bench

# the six Spec-Bench tasks, BENCH_LIMIT prompts each, every row
bench-quick: install bench-install
	$(VENV)/bin/via-sd bench --prompts $(BENCH_PROMPTS) --categories $(BENCH_CATEGORIES) \
		--limit-per-category $(BENCH_LIMIT) --max-tokens $(BENCH_MAX_TOKENS) --peers $(BENCH_PEERS) \
		--out $(BENCH_OUT)/quick.json

# the three_tier speed-quality frontier (README): with the controller off, the slim tier runs at
# every drafted step, so the gate's thresholds decide what the lossy tiers accept; the shipped
# defaults (controller on) run beside it, with `off` and `binary`, taking turns prompt by prompt
BENCH_SWEEP ?= controller=0;escalate_threshold=0.2;accept_threshold=0.3,0.5,0.7,0.9;slim_confidence=0.3,0.5,0.7,0.9
bench-sweep: install bench-install
	$(VENV)/bin/via-sd bench --prompts $(BENCH_PROMPTS) --categories $(BENCH_CATEGORIES) \
		--limit-per-category 5 --max-tokens 128 --modes off,binary,three_tier --drafters hybrid \
		--peers '' --sweep '$(BENCH_SWEEP)' --sweep-mode full --out $(BENCH_OUT)/sweep.json

# throughput and TTFT of `via-sd serve` (and `vllm serve` when .venv-vllm exists) under concurrency
bench-load: install bench-install
	$(VENV)/bin/via-sd bench --load --concurrency 1,4,16,64 --requests 64 --max-tokens $(BENCH_MAX_TOKENS) \
		--peers vllm --out $(BENCH_OUT)/load.json
