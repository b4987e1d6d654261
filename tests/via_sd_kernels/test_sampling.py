import torch

from via_sd_kernels import SpecMetadata, verify_binary
from via_sd_kernels.sampling import logits_to_probs, sample_from_probs, uniforms_and_noise


def test_temperature_zero_rows_are_one_hot_and_sample_their_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [0.1, 2.0, -1.0]])
    probs = logits_to_probs(logits, torch.tensor([0.0, 1.0]))
    assert probs[0].tolist() == [0.0, 1.0, 0.0]
    assert torch.allclose(probs[1], logits[1].softmax(-1))
    noise = torch.empty(2, 3).exponential_(generator=torch.Generator().manual_seed(0))
    assert sample_from_probs(probs, noise)[0].item() == 1


def test_a_seeded_request_verifies_the_same_whatever_shares_its_batch():
    v = 16
    g = torch.Generator().manual_seed(3)
    q_a = torch.softmax(torch.randn(3, v, generator=g), -1)  # request A: 2 drafts
    q_b = torch.softmax(torch.randn(4, v, generator=g), -1)  # request B: 3 drafts
    drafts_a, drafts_b = [1, 2], [3, 4, 5]

    def run(with_b: bool) -> list[int]:
        lists = [drafts_a] + ([drafts_b] if with_b else [])
        gens = [torch.Generator().manual_seed(42)] + ([torch.Generator().manual_seed(7)] if with_b else [])
        u, noise = uniforms_and_noise([len(x) for x in lists], v, gens)
        q = torch.cat([q_a, q_b]) if with_b else q_a
        out = verify_binary(SpecMetadata.from_lists(lists), q, None, u, noise)
        return out.output_token_ids[0, : out.num_output[0]].tolist()

    assert run(False) == run(True)


def test_sampled_rows_with_winning_noise_make_verification_emit_each_rows_sample():
    """Deterministic drafts verified with uniform 0 where the row's own sample is the draft, 1
    elsewhere, and noise rows the samples win: verification emits at each row that row's sample
    (accepted drafts, the recovered token, the bonus), so the output is what plain sampling with
    the same uniforms gives, however the drafts were cut. Drafts here are half the rows' samples,
    half other tokens, so both branches of the rule run; the third request is greedy."""
    from via_sd_kernels.sampling import position_uniforms, sample_by_uniform, winning_noise

    v, g = 12, torch.Generator().manual_seed(5)
    for trial in range(40):
        n = [int(x) for x in torch.randint(0, 5, (3,), generator=g)]
        rows = sum(n) + len(n)
        q = torch.softmax(torch.randn(rows, v, generator=g) * 1.5, -1)
        greedy = slice(rows - n[2] - 1, rows)
        q[greedy] = torch.nn.functional.one_hot(q[greedy].argmax(-1), v).float()
        u = position_uniforms([trial, trial + 100, None], [10, 20, 30], [k + 1 for k in n])
        sample = sample_by_uniform(q, u)
        assert torch.equal(sample[greedy], q[greedy].argmax(-1))
        drafts, r = [], 0
        for k in n:
            drafts.append([int(sample[r + j]) if torch.rand(1, generator=g) < 0.5
                           else int(torch.randint(0, v, (1,), generator=g)) for j in range(k)])
            r += k + 1
        starts = [sum(k + 1 for k in n[:i]) for i in range(len(n))]
        idx = torch.tensor([s + j for s, k in zip(starts, n) for j in range(k)], dtype=torch.int64)
        flat = torch.tensor([t for d in drafts for t in d], dtype=torch.int64)
        uniforms = torch.where(sample[idx] == flat, 0.0, 1.0)
        out = verify_binary(SpecMetadata.from_lists(drafts), q, None, uniforms, winning_noise(sample, v),
                            backend="torch")
        for i, (s, k) in enumerate(zip(starts, n)):
            m = int(out.num_output[i])
            want = sample[s:s + k + 1].tolist()
            cut = next((j for j in range(k) if drafts[i][j] != want[j]), k)  # the first draft that lost
            assert out.output_token_ids[i, :m].tolist() == want[:cut + 1]


def test_sampling_by_uniform_follows_the_distribution_and_never_takes_a_zero():
    from via_sd_kernels.sampling import sample_by_uniform

    p = torch.tensor([0.5, 0.0, 0.2, 0.0, 0.3])
    u = torch.rand(20000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    counts = torch.bincount(sample_by_uniform(p.expand(20000, 5), u), minlength=5).double() / 20000
    assert counts[1] == counts[3] == 0
    assert torch.allclose(counts, p.double(), atol=0.015)
    # the ends: u = 0 takes the first token with mass, u just below 1 the last
    edge = sample_by_uniform(p.expand(2, 5), torch.tensor([0.0, 1.0 - 2 ** -53], dtype=torch.float64))
    assert edge.tolist() == [0, 4]


def test_position_uniforms_depend_on_the_seed_and_position_only():
    from via_sd_kernels.sampling import position_uniforms

    a = position_uniforms([7], [40], [3])
    b = position_uniforms([1, 7, None], [0, 41, 5], [2, 1, 2])  # another request first, then row 41 of seed 7
    assert a[1] == b[2] and a[0] != a[1] and b[3:].tolist() == [0.5, 0.5]
    assert position_uniforms([8], [40], [1])[0] != a[0]
    assert ((a >= 0) & (a < 1)).all()


def test_position_noise_depends_on_the_seed_and_position_only():
    from via_sd_kernels.sampling import position_noise

    a = position_noise([7], [40], [3], 50)
    b = position_noise([1, 7], [0, 41], [2, 1], 50)  # another request first, then row 41 of seed 7 alone
    assert torch.equal(a[1], b[2]) and not torch.equal(a[0], a[1])
    assert not torch.equal(position_noise([8], [40], [1], 50)[0], a[0])
    assert (a > 0).all()


def test_sampling_by_uniform_in_blocks_is_the_whole_rows_inverse_cdf():
    """The two-level search (block sums, then one block) takes the token a running sum over the
    whole row takes, vocabularies that fill their last block or not, top-k-like zeros included."""
    from via_sd_kernels.sampling import SAMPLE_BLOCK, sample_by_uniform

    g = torch.Generator().manual_seed(2)
    for v in (SAMPLE_BLOCK * 3, 1000, 7):
        p = torch.softmax(torch.randn(4000, v, generator=g) * 2, -1)
        p[:, ::3] = 0  # holes, as top-k and top-p leave
        u = torch.rand(4000, generator=g, dtype=torch.float64)
        c = p.double().cumsum(-1)
        flat = torch.searchsorted(c, (u * c[:, -1])[:, None], right=True).squeeze(1)
        got = sample_by_uniform(p, u)
        assert (p.gather(1, got[:, None]) > 0).all()
        assert (got == flat).float().mean() > 0.999
