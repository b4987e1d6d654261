#!/bin/sh
# CMake options for building llama.cpp (llama-cpp-python) for this machine: the vector extensions
# its CPU reports, as GGML_NATIVE would pick them, but without AMX (ggml's AMX kernel crashed on
# the bundled model's Q4_1 layers). Without the multimodal library (mtmd, `LLAVA_BUILD`): the rows
# load text models only. On the 2-core AVX2 box, `make install-test`'s llama.cpp step took 6.8
# minutes with it (12.0 CPU-minutes); the compile alone took 5.1 without it (9.3 CPU-minutes).
# Printed on one line for CMAKE_ARGS.
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
has() { case " $flags " in *" $1 "*) echo ON ;; *) echo OFF ;; esac; }
echo "-DGGML_NATIVE=OFF -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma)" \
	"-DGGML_F16C=$(has f16c) -DGGML_BMI2=$(has bmi2) -DGGML_AVX_VNNI=$(has avx_vnni)" \
	"-DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VBMI=$(has avx512vbmi) -DGGML_AVX512_VNNI=$(has avx512_vnni)" \
	"-DGGML_AVX512_BF16=$(has avx512_bf16) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF"
