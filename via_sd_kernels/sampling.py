"""Turning logits into the distributions that sampling and verification use.

`logits_to_probs` applies each row's temperature, min-p, top-k and top-p (in that order, as vLLM
does) and returns probabilities; a row with temperature 0 becomes the one-hot of its
argmax, so greedy and sampled rows share one code path downstream.

Randomness comes from a `torch.Generator` per request, so a request with a seed is reproducible
whatever else is in the batch. `sample_from_probs` uses the exponential race
(argmax p / E, E ~ Exp(1)), which is exact and needs one noise vector per row.

The embedded engine samples by *position* instead: the row that samples token j of a sequence
takes one uniform, a hash of the request's seed and j (`position_uniforms`), and draws its token
by inverse CDF (`sample_by_uniform`: one random number per row, where the race reads V). To
verify deterministic drafts it samples every row of the pass so, keeps a draft exactly where its
row's sample is that draft (uniform 0, else 1: the rule `u p(d) < t(d)` keeps it with the
probability t(d), as before) and hands verification noise rows that its sample wins
(`winning_noise`), so recovered tokens and bonuses are those samples too. Every emitted token is
then its row's sample, whether a plain step, an accepted draft, a recovered token or a bonus
produced it: a seeded request's output does not depend on how its drafts were cut (the lengths
follow measured pass costs and engine-wide acceptance), and `binary` samples the tokens `off`
samples.
"""

from __future__ import annotations

import torch


def logits_to_probs(
    logits: torch.Tensor,  # [N, V]
    temperature: torch.Tensor,  # [N] float; 0 = greedy
    top_k: torch.Tensor | None = None,  # [N] int; 0 = off
    top_p: torch.Tensor | None = None,  # [N] float; 1 = off
    min_p: torch.Tensor | None = None,  # [N] float; 0 = off
) -> torch.Tensor:  # [N, V] float32
    logits = logits.float()
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    scaled = logits / t[:, None]
    if min_p is not None and bool((min_p > 0).any()):
        # p(x) < min_p * max p  <=>  scaled(x) < max scaled + log(min_p)
        floor = scaled.max(-1, keepdim=True).values + torch.log(min_p.float())[:, None]
        scaled = scaled.masked_fill(scaled < floor, float("-inf"))
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


_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def position_uniforms(seeds: list[int | None], starts: list[int], counts: list[int]) -> torch.Tensor:
    """One uniform in [0, 1) per row (float64, on the host): row k of request i is a hash
    (splitmix64) of `position_seed(seeds[i], starts[i] + k)`, the row that samples token
    starts[i] + k. A request with seed None (greedy) gets 0.5: a one-hot row takes its argmax
    whatever the uniform."""
    vals: list[float] = []
    for seed, start, n in zip(seeds, starts, counts):
        if seed is None:
            vals += [0.5] * n
        else:
            vals += [(_splitmix64(position_seed(seed, start + k)) >> 11) / float(1 << 53) for k in range(n)]
    return torch.tensor(vals, dtype=torch.float64)


SAMPLE_BLOCK = 256  # tokens per block of `sample_by_uniform`'s two-level search


def sample_by_uniform(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:  # [N] int64
    """Inverse-CDF sampling: in each row of `probs` [N, V], the first token whose running sum
    exceeds u times the row's total (u [N] in [0, 1)). Exact up to float32 rounding of the sums,
    with one uniform per row where the exponential race needs V draws; a token of probability 0
    is never taken. Two levels, since a running sum over a whole row is a serial scan: the sums of
    blocks of `SAMPLE_BLOCK` tokens (a reduction), their running sum to find the block, and the
    running sum of that block alone."""
    n, v = probs.shape
    p = probs.float()
    nb = -(-v // SAMPLE_BLOCK)
    if nb * SAMPLE_BLOCK != v:
        p = torch.nn.functional.pad(p, (0, nb * SAMPLE_BLOCK - v))
    blocks = p.view(n, nb, SAMPLE_BLOCK)
    sums = blocks.sum(-1)  # [N, nb]
    ends = sums.cumsum(-1)
    x = u.to(p.device, torch.float32) * ends[:, -1]
    b = torch.searchsorted(ends, x[:, None], right=True).squeeze(1).clamp_(max=nb - 1)
    rows = torch.arange(n, device=p.device)
    before = (ends[rows, b] - sums[rows, b])[:, None]
    within = torch.searchsorted(blocks[rows, b].cumsum(-1) + before, x[:, None], right=True).squeeze(1)
    idx = (b * SAMPLE_BLOCK + within.clamp_(max=SAMPLE_BLOCK - 1)).clamp_(max=v - 1)
    bad = probs.gather(1, idx[:, None]).squeeze(1) <= 0  # float rounding at a block's edge: rare
    if bool(bad.any()):
        idx = torch.where(bad, probs.argmax(-1), idx)
    return idx


def winning_noise(tokens: torch.Tensor, vocab: int) -> torch.Tensor:  # [N, V]
    """Noise rows whose exponential race `tokens` [N] win: ones, and 2^-60 at the token, so
    argmax(t / E) is the token for any distribution t that gives it more than 2^-60 of its
    largest probability, as one it was drawn from does (up to chances below 1e-18). Verification
    (`verify.py`) races these rows for a recovered token or a bonus; with `tokens` sampled from the
    rows' own distributions it emits exactly those samples (a rejected draft is another token, so
    taking it out of the residual leaves the winner first)."""
    noise = torch.ones(len(tokens), vocab, device=tokens.device)
    return noise.scatter_(1, tokens[:, None], 2.0 ** -60)
