# llama.cpp peer rows of `via-sd bench` (`--peers llamacpp,llamacpp_pld`), through llama-cpp-python
# in the main venv. PyPI has only its source, so pip compiles llama.cpp (about 5 minutes on 2 cores).
#   make llamacpp-install
# The build takes this machine's vector extensions (mk/llamacpp_cmake_args.sh: GGML_NATIVE's set,
# without AMX, whose ggml kernel crashed on the bundled model's Q4_1 layers on an AMX Xeon).
# mk/llamacpp_wheel.sh keeps the wheel it builds beside pip's cache, in a folder named by the
# version, those CMake options, the interpreter and the compiler: a later install on a machine with
# the same vector extensions (a CI run that keeps pip's cache) takes seconds, and a wheel built for
# one CPU is never installed on another. The source archive is downloaded through pip's cache.
LLAMACPP_VERSION ?= 0.3.36
LLAMACPP_SRC := build/llamacpp
LLAMACPP_WHEELS ?= $(PIP_CACHE)/via-sd-wheels

.PHONY: llamacpp-install

$(VENV)/.installed-llamacpp: $(VENV)/.installed mk/llamacpp.mk mk/llamacpp_cmake_args.sh mk/llamacpp_wheel.sh
	sh mk/llamacpp_wheel.sh $(PY) $(LLAMACPP_VERSION) $(LLAMACPP_SRC) $(LLAMACPP_WHEELS) $(PIP_CACHE)
	$(PY) -c "import llama_cpp; assert llama_cpp.__version__ == '$(LLAMACPP_VERSION)'"
	touch $@

llamacpp-install: $(VENV)/.installed-llamacpp

# `make bench` runs the llama.cpp rows; the tests run them on the bundled model
bench: $(VENV)/.installed-llamacpp
install-test: $(VENV)/.installed-llamacpp
