"""The VIA-SD math as pure functions on batched, ragged tensors (no engine, no HTTP, no vLLM).

- `SpecMetadata` (metadata.py): a ragged batch of drafts as flat tensors with `cu_*` offsets.
- `gate` (gate.py): tier A / B / C for every draft token from the slim verifier's q'.
- `verify_binary`, `verify_three_tier` (verify.py): lossless SD and VIA-SD verification.
- `Route`, `SublayerCosts` (routes.py) and `search_route` (route_search.py): which sub-layers the
  slim verifier runs, and how to find a good set at a target cost.
- sampling.py: logits to probabilities, exponential-race sampling, per-request noise.
- lenient.py: the full model's threshold (`full_accept_threshold`) and its repetition guard, which
  the embedded engine and the vLLM plugin both apply before verification.

`gate`, `verify_binary` and `verify_three_tier` take `backend="auto" | "torch" | "triton"`; auto
runs the Triton kernels (triton/) on CUDA tensors and the torch reference elsewhere.
"""

from .gate import TIER_ACCEPT, TIER_FULL, TIER_SLIM, TIER_UNDECIDED, GateOutput, gate, gate_torch
from .metadata import SpecMetadata
from .route_search import Evaluation, SearchResult, matchness, search_route
from .routes import Route, SublayerCosts
from .verify import VerifyCounts, VerifyOutput, verify_binary, verify_binary_greedy_host, verify_three_tier

__all__ = [
    "TIER_ACCEPT",
    "TIER_FULL",
    "TIER_SLIM",
    "TIER_UNDECIDED",
    "Evaluation",
    "GateOutput",
    "Route",
    "SearchResult",
    "SpecMetadata",
    "SublayerCosts",
    "VerifyCounts",
    "VerifyOutput",
    "gate",
    "gate_torch",
    "matchness",
    "search_route",
    "verify_binary",
    "verify_binary_greedy_host",
    "verify_three_tier",
]
