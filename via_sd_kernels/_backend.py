"""Choosing between the torch reference and the Triton kernels.

`backend="auto"` picks Triton when the tensors are on CUDA and Triton imports, the torch reference
otherwise. `backend="triton"` on CPU tensors works only under Triton's interpreter
(`TRITON_INTERPRET=1` set before the kernels are first imported), which the tests use.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Return "torch" or "triton" for tensors on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package; install it or use backend='torch'")
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before the kernels are "
                "imported (CPU interpreter); use backend='torch' on CPU"
            )
    return backend
