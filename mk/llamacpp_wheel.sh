#!/bin/sh
# Installs llama-cpp-python built for this machine into the venv of PYTHON. The wheel is compiled
# once (about 5 minutes on 2 cores) and kept under WHEELS, in a folder named by what makes a build
# differ: the version, the CMake options (the CPU's vector extensions, mk/llamacpp_cmake_args.sh),
# the interpreter and platform, and the compiler. A machine with other vector extensions gets a
# folder of its own, so a wheel built for one CPU is never installed on another.
#   sh mk/llamacpp_wheel.sh PYTHON VERSION SOURCE_DIR WHEELS PIP_CACHE
set -eu
py=$1 version=$2 src=$3 wheels=$4 cache=$5
args=$(sh mk/llamacpp_cmake_args.sh)
what=$(printf '%s\n' "$version" "$args" \
	"$("$py" -c 'import sys, sysconfig; print(sys.implementation.cache_tag, sysconfig.get_platform())')" \
	"$(cc --version 2>/dev/null | head -n 1)")
dir=$wheels/llama-cpp-python-$version-$(printf '%s' "$what" | sha256sum | cut -c1-16)
if ! ls "$dir"/llama_cpp_python-"$version"-*.whl >/dev/null 2>&1; then
	"$py" -m pip download --cache-dir "$cache" -q --no-deps --no-binary :all: -d "$src" \
		llama-cpp-python=="$version"
	mkdir -p "$wheels"
	tmp=$(mktemp -d "$dir.partial.XXXXXX")
	CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$py" -m pip wheel --no-cache-dir -q --no-deps \
		-w "$tmp" "$src/llama_cpp_python-$version.tar.gz"
	printf '%s\n' "$what" > "$tmp/BUILT_FOR"
	rm -rf "$dir"
	mv "$tmp" "$dir"
fi
# its dependencies but diskcache are the project's own (numpy, jinja2, typing-extensions)
"$py" -m pip install --cache-dir "$cache" -q diskcache==5.6.3
"$py" -m pip install --no-cache-dir -q --no-deps --force-reinstall "$dir"/llama_cpp_python-"$version"-*.whl
