"""The VIA-SD math as pure functions on batched, ragged tensors (no engine, no HTTP, no vLLM)."""
