# llama.cpp peer rows of `via-sd bench` (`--peers llamacpp,llamacpp_pld`), through llama-cpp-python
# in the main venv. PyPI has only its source, so pip compiles llama.cpp (about 5 minutes on 2 cores).
#   make llamacpp-install
# The build takes this machine's vector extensions (mk/llamacpp_cmake_args.sh: GGML_NATIVE's set,
# without AMX, whose ggml kernel crashed on the bundled model's Q4_1 layers on an AMX Xeon), so
# the wheel is built without pip's wheel cache: a wheel for one CPU must not be reused on another.
# The source archive itself is downloaded through the cache.
LLAMACPP_VERSION ?= 0.3.36
LLAMACPP_SRC := build/llamacpp

.PHONY: llamacpp-install

$(VENV)/.installed-llamacpp: $(VENV)/.installed mk/llamacpp.mk mk/llamacpp_cmake_args.sh
	$(PIP) download --cache-dir $(PIP_CACHE) -q --no-deps --no-binary :all: -d $(LLAMACPP_SRC) \
		llama-cpp-python==$(LLAMACPP_VERSION)
	# its dependencies but diskcache are the project's own (numpy, jinja2, typing-extensions)
	$(PIP) install --cache-dir $(PIP_CACHE) -q diskcache==5.6.3
	CMAKE_ARGS="$$(sh mk/llamacpp_cmake_args.sh)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PIP) install --no-cache-dir -q --no-deps $(LLAMACPP_SRC)/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz
	$(PY) -c "import llama_cpp; assert llama_cpp.__version__ == '$(LLAMACPP_VERSION)'"
	touch $@

llamacpp-install: $(VENV)/.installed-llamacpp

# `make bench` runs the llama.cpp rows; the tests run them on the bundled model
bench: $(VENV)/.installed-llamacpp
install-test: $(VENV)/.installed-llamacpp
