"""Triton kernels for the gate and verification, one program per sequence.

Imported lazily by the dispatchers (`via_sd_kernels.gate`, `verify_binary`, `verify_three_tier`)
so that `import via_sd_kernels` never imports triton. Each kernel mirrors its torch reference
decision for decision: thresholds are compared as products (no division), sampling divides with
IEEE round-to-nearest (`div_rn`) and argmax keeps the first maximum, so greedy results are bit
identical and sampled results identical under the same randoms.

Everything per sequence runs in Triton: the gate's scan (row max, ratio test, stop, bonus
confidence) and verification's scan (acceptance test, first rejection), the final token (argmax
of residual/noise with the fallback to target/noise, or the greedy argmax) and the writes of the
padded output, tiers and counts. The Python wrappers only allocate and launch. One program per
sequence walks its vocabulary rows in BLOCK-sized chunks; with a small batch and a large
vocabulary that leaves most of the GPU idle (a split-vocabulary variant is future work), but it
never reads a row the decision does not need.

Tests run these kernels on CPU tensors with `TRITON_INTERPRET=1`, which must be set before triton
is first imported (its decorators, the standard library's included, choose interpreter or
compiler then), and compile them for sm_90 with the ptxas triton ships.
"""
