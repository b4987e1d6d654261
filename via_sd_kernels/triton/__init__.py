"""Triton kernels for the gate and verification, one program per sequence.

Imported lazily by the dispatchers (`via_sd_kernels.gate`, `verify_binary`, `verify_three_tier`)
so that `import via_sd_kernels` never imports triton. Each kernel mirrors its torch reference
decision for decision: thresholds are compared as products (no division), sampling divides with
IEEE round-to-nearest (`div_rn`) and argmax keeps the first maximum, so greedy results are bit
identical and sampled results identical under the same randoms.

Tests run these kernels on CPU tensors with `TRITON_INTERPRET=1`, which must be set before this
package's kernel modules are first imported (the decorator picks interpreter or compiler then).
"""
