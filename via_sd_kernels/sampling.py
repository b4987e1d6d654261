"""Turning logits into the distributions that sampling and verification use.

`logits_to_probs` applies each row's temperature, top-k and top-p (in that order, as vLLM and
Hugging Face do) and returns probabilities; a row with temperature 0 becomes the one-hot of its
argmax, so greedy and sampled rows share one code path downstream.

Randomness comes from a `torch.Generator` per request, so a request with a seed is reproducible
whatever else is in the batch. `sample_from_probs` uses the exponential race
(argmax p / E, E ~ Exp(1)), which is exact and needs one noise vector per row.

The embedded engine draws its noise per *position* instead (`position_noise`: the row that
samples token j of a sequence comes from a generator seeded by the request's seed and j), and
verifies deterministic drafts with `coupled_uniforms`: then every token it emits is the race's
sample of its own row, whether a plain step, an accepted draft, a recovered token or a bonus
produced it. So a seeded request's output does not depend on how its drafts were cut (the
lengths follow measured pass costs and engine-wide acceptance) or verified, and `binary`
samples the tokens `off` samples.
"""

from __future__ import annotations

import torch


def logits_to_probs(
    logits: torch.Tensor,  # [N, V]
    temperature: torch.Tensor,  # [N] float; 0 = greedy
    top_k: torch.Tensor | None = None,  # [N] int; 0 = off
    top_p: torch.Tensor | None = None,  # [N] float; 1 = off
) -> torch.Tensor:  # [N, V] float32
    logits = logits.float()
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    scaled = logits / t[:, None]
    if top_k is not None and bool((top_k > 0).any()):
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, logits.shape[-1])).clamp(max=logits.shape[-1])
        kth = torch.sort(scaled, dim=-1, descending=True).values.gather(-1, (k - 1).long()[:, None])
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p is not None and bool((top_p < 1).any()):
        sorted_logits, idx = torch.sort(scaled, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # keep a token while the mass before it is < top_p (the top token is always kept)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= top_p.float()[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    probs = scaled.softmax(-1)
    if bool(greedy.any()):
        onehot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], onehot, probs)
    return probs


def exponential_noise(
    num_rows_per_request: list[int], vocab: int, generators: list[torch.Generator | None], device=None
) -> torch.Tensor:  # [sum(num_rows_per_request), V]
    """Exp(1) noise, each request's rows drawn from its own generator."""
    chunks = []
    for n, g in zip(num_rows_per_request, generators):
        chunks.append(torch.empty(n, vocab, device=device).exponential_(generator=g))
    if not chunks:
        return torch.empty(0, vocab, device=device)
    return torch.cat(chunks)


def sample_from_probs(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:  # [N] int64
    """Exact sampling by the exponential race: argmax(probs / noise). A one-hot row returns its
    argmax whatever the noise."""
    return (probs / noise).argmax(-1)


def uniforms_and_noise(
    num_draft_tokens: list[int], vocab: int, generators: list[torch.Generator | None], device=None
) -> tuple[torch.Tensor, torch.Tensor]:  # ([T], [T+B, V])
    """The randoms verification needs, each request's drawn from its own generator in a fixed
    order (its n uniforms, then its n+1 noise rows), so a seeded request samples the same tokens
    whatever shares its batch. Returns (uniforms [T], noise [T+B, V]) in `SpecMetadata` layout."""
    uniforms, noise = [], []
    for n, g in zip(num_draft_tokens, generators):
        uniforms.append(torch.rand(n, device=device, generator=g))
        noise.append(torch.empty(n + 1, vocab, device=device).exponential_(generator=g))
    if not uniforms:
        return torch.empty(0, device=device), torch.empty(0, vocab, device=device)
    return torch.cat(uniforms), torch.cat(noise)


_MIX = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads (seed, position) over the generator's seeds


def position_seed(seed: int, position: int) -> int:
    """The generator seed of the row that samples token `position` of a request seeded `seed`."""
    return (seed * _MIX + (position + 1) * 0xBF58476D1CE4E5B9) % (1 << 63)


def position_noise(
    seeds: list[int | None], starts: list[int], counts: list[int], vocab: int
) -> torch.Tensor:  # [sum(counts), V] on the host
    """Exp(1) noise for `counts[i]` rows of request i, row k sampling its token at position
    `starts[i] + k`, each row drawn from its own generator (`position_seed`). A request with seed
    None (greedy) gets rows of ones: a one-hot row ignores its noise."""
    rows = []
    for seed, start, n in zip(seeds, starts, counts):
        if seed is None:
            rows.append(torch.ones(n, vocab))
            continue
        for k in range(n):
            g = torch.Generator().manual_seed(position_seed(seed, start + k))
            rows.append(torch.empty(1, vocab).exponential_(generator=g))
    if not rows:
        return torch.empty(0, vocab)
    return torch.cat(rows)


def coupled_uniforms(
    drafts: torch.Tensor,  # [T] deterministic draft tokens
    targets: torch.Tensor,  # [T, V] the distribution that tests each draft (q, or q' for tier B)
    noise: torch.Tensor,  # [T, V] the noise rows of those positions
) -> torch.Tensor:  # [T] float32, 0 or 1
    """Uniforms that make verification keep a deterministic draft d exactly when the exponential
    race of its row picks it: 0 where argmax(t / E) == d, else 1. The rule `u p(d) < t(d)` (p
    one-hot) then keeps d with probability t(d), as uniform u would, and a rejected d is
    recovered from the residual t without d by the same race, whose winner is argmax(t / E)
    (the winner was not d, so taking d out leaves it first). Every emitted token is thus the
    race's sample of its row, the token a plain step with that noise samples."""
    hit = (targets.float() / noise).argmax(-1) == drafts
    return torch.where(hit, 0.0, 1.0).to(torch.float32)
