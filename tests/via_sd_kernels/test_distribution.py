"""Statistical tests: binary SD follows the target exactly; three-tier follows its analytic mixture.

Each test draws >= 100,000 sequences in one batch with a fixed seed and compares token counts
with the expected distribution by a chi-square test at significance 0.001 (scipy is not a
dependency, so the statistic is compared with tabulated critical values).
"""

import numpy as np
import torch

from via_sd_kernels import SpecMetadata, gate, verify_binary, verify_three_tier

# chi-square critical values at significance 0.001, by degrees of freedom
CHI2_CRIT_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}
N = 100_000


def assert_chi2(tokens: torch.Tensor, expected: np.ndarray) -> None:
    """tokens drawn from `expected` (a distribution over V) at significance 0.001."""
    observed = np.bincount(tokens.numpy(), minlength=len(expected)).astype(np.float64)
    e = expected * observed.sum()
    support = expected > 0
    assert observed[~support].sum() == 0, f"tokens outside the support: {observed}"
    stat = float(((observed[support] - e[support]) ** 2 / e[support]).sum())
    df = int(support.sum()) - 1
    assert stat < CHI2_CRIT_001[df], f"chi2 = {stat:.1f} (df {df}), observed {observed}, expected {e.round()}"


def residual(target: np.ndarray, p: np.ndarray) -> np.ndarray:
    r = np.maximum(target - p, 0.0)
    return r / r.sum() if r.sum() > 0 else target


def _draw(probs_rows: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.multinomial(probs_rows, 1, generator=g).squeeze(1)


def test_binary_sampling_follows_the_target_distribution():
    g = torch.Generator().manual_seed(1234)
    v, gamma = 8, 2
    q_pos = torch.softmax(torch.randn(gamma + 1, v, generator=g), -1)  # q at positions 0, 1, bonus
    p_pos = torch.softmax(torch.randn(gamma, v, generator=g), -1)
    n = torch.full((N,), gamma)
    draft_probs = p_pos.repeat(N, 1)  # [T, V], positions alternate 0, 1
    meta = SpecMetadata.from_tensors(_draw(draft_probs, g), n, gamma)
    q = q_pos.repeat(N, 1)  # [T+B, V], rows alternate 0, 1, bonus
    u = torch.rand(meta.num_tokens, generator=g)
    noise = torch.empty(meta.num_rows, v).exponential_(generator=g)
    out = verify_binary(meta, q, draft_probs, u, noise)
    tok = out.output_token_ids
    assert_chi2(tok[:, 0], q_pos[0].double().numpy())
    # given the first draft was kept, position 1 is verified against q_1 and emits q_1 exactly
    kept_first = out.counts.accepted >= 1
    assert int(kept_first.sum()) > N // 4
    assert_chi2(tok[kept_first, 1], q_pos[1].double().numpy())


def test_binary_sampling_with_a_deterministic_drafter_follows_the_target():
    g = torch.Generator().manual_seed(99)
    v = 8
    q_pos = torch.softmax(torch.randn(2, v, generator=g), -1)
    drafts = torch.randint(0, v, (N,), generator=g)  # any drafter, p = one-hot
    meta = SpecMetadata.from_tensors(drafts, torch.ones(N, dtype=torch.long), 1)
    out = verify_binary(
        meta, q_pos.repeat(N, 1), None, torch.rand(N, generator=g), torch.empty(2 * N, v).exponential_(generator=g)
    )
    assert_chi2(out.output_token_ids[:, 0], q_pos[0].double().numpy())


def test_three_tier_sampling_follows_its_analytic_mixture():
    """One draft position. With d ~ p and the gate's tier(y) from q'_1 (temperature 1):

    P(first = x) = sum_y p(y) K_tier(y)(x | y), where
      K_A(x|y) = [x = y]                                    (tier A keeps the draft)
      K_B(x|y) = a'(y)[x = y] + (1 - a'(y)) res(q', p)(x)    a'(y) = min(1, q'(y)/p(y))
      K_C(x|y) = a(y)[x = y]  + (1 - a(y))  res(q, p)(x)     a(y)  = min(1, q(y)/p(y))
    with q' here the *scaled* slim distribution and res(t, p) = norm(max(0, t - p)) (t if 0).
    After a tier-A draft the bonus follows q'_bonus (scaled) when max q'_1,bonus >= the
    request's bonus_confidence, else q_bonus.
    """
    v = 8
    s1 = np.array([0.30, 0.25, 0.15, 0.10, 0.08, 0.06, 0.04, 0.02])  # ratios 1 .83 .5 .33 .27 .2 .13 .07
    acc, esc = 0.7, 0.3  # -> A {0, 1}, B {2, 3}, C {4..7}
    p = np.array([0.10, 0.20, 0.05, 0.15, 0.10, 0.20, 0.10, 0.10])
    q = np.array([0.05, 0.10, 0.20, 0.05, 0.30, 0.10, 0.15, 0.05])
    s = s1 ** (1 / 0.7) / (s1 ** (1 / 0.7)).sum()  # the request's temperature 0.7
    s1_bonus = np.array([0.95, 0.01, 0.01, 0.01, 0.01, 0.005, 0.005, 0.0])
    s_bonus = np.array([0.6, 0.1, 0.1, 0.1, 0.05, 0.03, 0.02, 0.0])
    q_bonus = np.array([0.1, 0.1, 0.1, 0.2, 0.2, 0.1, 0.1, 0.1])

    ratio = s1 / s1.max()
    tier = np.where(ratio < esc, 2, np.where(ratio >= acc, 0, 1))
    expected = np.zeros(v)
    for y in range(v):
        if tier[y] == 0:
            expected[y] += p[y]
            continue
        t = s if tier[y] == 1 else q
        a = min(1.0, t[y] / p[y])
        expected[y] += p[y] * a
        expected += p[y] * (1 - a) * residual(t, p)

    g = torch.Generator().manual_seed(7)
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    draft_probs = f32(p).repeat(N, 1)
    meta = SpecMetadata.from_tensors(_draw(draft_probs, g), torch.ones(N, dtype=torch.long), 1)
    slim_probs = torch.stack([f32(s1), f32(s1_bonus)]).repeat(N, 1)
    slim_scaled = torch.stack([f32(s), f32(s_bonus)]).repeat(N, 1)
    full_probs = torch.stack([f32(q), f32(q_bonus)]).repeat(N, 1)
    half = torch.arange(N) < N // 2
    bonus_conf = torch.where(half, 0.9, 1.5)  # first half: slim bonus; second half: full bonus
    gate_out = gate(slim_probs, meta, torch.full((N,), acc), torch.full((N,), esc), bonus_conf)
    out = verify_three_tier(
        meta,
        gate_out,
        slim_scaled,
        full_probs,
        draft_probs,
        torch.rand(N, generator=g),
        torch.empty(2 * N, v).exponential_(generator=g),
    )
    tok = out.output_token_ids
    assert_chi2(tok[:, 0], expected)
    tier_a = out.tiers == 0
    assert_chi2(tok[tier_a & half, 1], s_bonus)
    assert_chi2(tok[tier_a & ~half, 1], q_bonus)
    # every tier-B sequence emits exactly one token; tier C emits two iff its draft was kept
    tier_b = out.tiers == 1
    assert bool((out.num_output[tier_b] == 1).all())
    assert abs(float(tier_b.float().mean()) - p[tier == 1].sum()) < 0.01


def test_lenient_sampling_follows_its_analytic_mixture():
    """The full model's threshold θ < 1 on a sampled request (lossy, as documented), as the engine
    applies it: a draft y ~ p whose temperature-1 probability is within θ of the best token's
    (logit(y) >= max logit + log θ) is kept outright; any other draft is verified exactly. So

      P(first = x) = sum_y p(y) ( keep(y) [x = y] + (1 - keep(y)) K_C(x | y) )

    with K_C the exact rejection kernel against q at the request's temperature (see above); the
    token after a kept draft follows q_bonus exactly."""
    from via_sd_kernels import lenient

    g = torch.Generator().manual_seed(4321)
    v, temp, theta = 8, 0.7, 0.5
    logits = torch.tensor([2.0, 1.6, 1.5, 0.2, -0.4, 0.9, -1.0, 1.9])  # near ties: 0, 7, 1 (and 2)
    bonus_logits = torch.randn(v, generator=g)
    q0 = torch.softmax(logits / temp, -1)
    qb = torch.softmax(bonus_logits / temp, -1)
    # a drafter that favours near-ties the full model ranks lower (where the rule changes things)
    p = torch.tensor([0.05, 0.10, 0.30, 0.05, 0.05, 0.05, 0.05, 0.35])
    drafts = _draw(p.repeat(N, 1), g)
    meta = SpecMetadata.from_tensors(drafts, torch.ones(N, dtype=torch.long), 1)
    rows = torch.arange(N) * 2  # rows alternate position 0, bonus
    kept, _ = lenient.keep(logits.repeat(N, 1), drafts, torch.full((N,), lenient.log_threshold(theta)))
    target = lenient.force(torch.stack([q0, qb]).repeat(N, 1), rows, drafts, kept, off=0.0, on=1.0)
    out = verify_binary(meta, target, p.repeat(N, 1), torch.rand(N, generator=g),
                        torch.empty(2 * N, v).exponential_(generator=g))

    keep_y = (logits >= logits.max() + np.log(theta)).double().numpy()
    assert keep_y.tolist() == [1, 1, 1, 0, 0, 0, 0, 1]
    pn, qn = p.double().numpy(), q0.double().numpy()
    a = np.minimum(1.0, qn / pn)
    res = residual(qn, pn)
    expected = np.zeros(v)
    for y in range(v):
        k_c = (1 - a[y]) * res
        k_c[y] += a[y]
        expected += pn[y] * (keep_y[y] * np.eye(v)[y] + (1 - keep_y[y]) * k_c)
    assert abs(expected.sum() - 1) < 1e-6  # float32 p and q
    assert np.abs(expected - qn).sum() / 2 > 0.05  # lossy: measurably not q
    tok = out.output_token_ids
    assert_chi2(tok[:, 0], expected)
    was_kept = kept & (tok[:, 0] == drafts)
    assert int(was_kept.sum()) > N // 4
    assert_chi2(tok[was_kept, 1], qb.double().numpy())
