# Load targets (tests/reliability). Included by the main Makefile, which defines PY and VENV.
#   make load                                   # starts `via-sd serve` on the tiny model itself
#   make load LOAD_URL=http://127.0.0.1:8000 LOAD_ARGS="--api-key KEY --model NAME"
# Prints requests/s and TTFT p50/p99; exits non-zero if any stream was wrong.

LOAD_CLIENTS ?= 128
LOAD_REQUESTS ?= 512
LOAD_MAX_TOKENS ?= 16
LOAD_URL ?=
LOAD_ARGS ?=

.PHONY: load test-reliability

load: install-test
	$(PY) -m tests.reliability.load_run --clients $(LOAD_CLIENTS) --requests $(LOAD_REQUESTS) \
		--max-tokens $(LOAD_MAX_TOKENS) $(if $(LOAD_URL),--url $(LOAD_URL)) $(LOAD_ARGS)

# the reliability tests alone (they also run in `make test`)
test-reliability: install-test
	$(PY) -m pytest -q tests/reliability
