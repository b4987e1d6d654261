#!/bin/sh
# Every GPU check of the project in one go, for a machine with one CUDA GPU and a Python that
# has torch and triton (`PYTHON`, default python3; about 4 minutes on one H100):
#
#   sh benchmarks/gpu_all.sh OUTDIR
#
# 1. tests/engine/test_device.py: CUDA greedy output equals the CPU's, graphs equal eager,
#    seeded sampling repeats, `train-head --device cuda`;
# 2. benchmarks/gpu_check.py: the Triton kernels against the torch reference (exit 1 on a difference);
# 3. benchmarks/gpu_engine.py: the engine on CUDA, a random ~1B Llama (decode, verification cost
#    for γ = 0..8 at batch 1 and 32, end to end for off / binary / three_tier);
# 4. benchmarks/gpu_head.py: the draft-head recipe at SmolLM2-135M's and Llama-3.2-1B's shapes.
#
# Each step has its own time limit and log under OUTDIR; a failing step does not stop the next.
# The JSON results land in OUTDIR too: copy them to benchmarks/results/ to keep them.
set -u
out=${1:?usage: sh benchmarks/gpu_all.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not found"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
status=0
step() {  # step NAME SECONDS COMMAND...
    name=$1; limit=$2; shift 2
    start=$(date +%s)
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    echo "== $name: rc=$rc in $(( $(date +%s) - start )) s (log $out/$name.log)"
    grep -v -i "warn" "$out/$name.log" | tail -n 12
    [ $rc -eq 0 ] || status=1
}
step test_device 240 "$py" -m pytest -q -p no:cacheprovider tests/engine/test_device.py
step gpu_check 180 "$py" benchmarks/gpu_check.py --out "$out/gpu_check.json"
step gpu_engine 180 "$py" benchmarks/gpu_engine.py --compare-eager --out "$out/gpu_engine.json"
step gpu_head 240 "$py" benchmarks/gpu_head.py --out "$out/gpu_head.json"
exit $status
