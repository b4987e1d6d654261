"""The CPU decode kernels (via_sd_kernels/cpu/decode.cpp) against torch references, and the
property the engine relies on: a token's result does not depend on how many tokens share its pass."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from via_sd_kernels import cpu

# a host with a C++ compiler must build the kernels: a failed build is a failure, not a skip
pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler for the CPU kernels")


@pytest.fixture(autouse=True, scope="module")
def _built():
    cpu.available()  # build (or find) the kernels, so that any one test can run alone


def test_kernels_build_on_this_host():
    assert cpu.available(), "the CPU decode kernels did not build (see the log for the compiler's message)"


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 9, 17, 32])
@pytest.mark.parametrize("K,N", [(64, 96), (576, 1731), (100, 7)])
def test_skinny_linear_matches_torch(M, K, N):
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g)
    r = torch.randn(M, N, generator=g)
    torch.testing.assert_close(cpu.skinny_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cpu.skinny_linear(x, w, r), r + F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_skinny_linear_rows_are_bitwise_independent_of_batch_size():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(11, 576, generator=g)
    w = torch.randn(1733, 576, generator=g)
    whole = cpu.skinny_linear(x, w)
    for m in range(11):
        assert torch.equal(cpu.skinny_linear(x[m : m + 1], w), whole[m : m + 1])
    assert torch.equal(cpu.skinny_linear(x[3:8], w), whole[3:8])


def _lane_tree(lanes: list[float]) -> float:
    """The kernel's fixed reduction of 16 fp32 lanes: halves, quarters, then (0 + 2) + (1 + 3)."""
    s = torch.tensor(lanes, dtype=torch.float32)
    t8 = s[:8] + s[8:]
    t4 = t8[:4] + t8[4:]
    return ((t4[0] + t4[2]) + (t4[1] + t4[3])).item()


@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 9])
def test_skinny_linear_sums_its_lanes_in_one_fixed_order(M):
    """One 16-wide step along K (K = 16, x of ones), so each lane holds one weight exactly and the
    output is the lane reduction alone. The weights mix 2^25 with small integers, so that other
    orders (sequential, pairwise neighbours) round to other values: the order a verified token's
    logits share with plain decoding's is pinned for every tile shape."""
    g = torch.Generator().manual_seed(M)
    big = float(2**25)
    rows = []
    for _ in range(37):
        lanes = [float(v) for v in torch.randint(-7, 8, (16,), generator=g)]
        for i in torch.randperm(16, generator=g)[:4].tolist():
            lanes[i] = big if i % 2 else -big
        rows.append(lanes)
    w = torch.tensor(rows, dtype=torch.float32)
    expected = torch.tensor([_lane_tree(r) for r in rows])
    sequential = torch.tensor([float(torch.tensor(r).cumsum(0)[-1]) for r in rows])
    assert not torch.equal(expected, sequential)  # the weights do tell orders apart
    out = cpu.skinny_linear(torch.ones(M, 16), w)
    for m in range(M):
        assert torch.equal(out[m], expected)


@pytest.mark.parametrize("M", [1, 3, 6, 33])
@pytest.mark.parametrize("K", [576, 600])
def test_skinny_linear_fp16_weights_are_widened_exactly(M, K):
    """The draft head's fp16 matrices: the kernel's sums are bitwise those of the same weights in fp32."""
    g = torch.Generator().manual_seed(M * 1000 + K)
    x, w = torch.randn(min(M, 32), K, generator=g), torch.randn(130, K, generator=g).half()
    assert torch.equal(cpu.skinny_linear(x, w), cpu.skinny_linear(x, w.float()))


def test_rms_norm_and_silu_mul_match_torch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 576, generator=g) * 3
    w = torch.rand(576, generator=g)
    torch.testing.assert_close(cpu.rms_norm(x, w, 1e-5), F.rms_norm(x, (576,), w, 1e-5), rtol=1e-5, atol=1e-5)
    gu = torch.randn(5, 2 * 96, generator=g) * 4
    gate, up = gu.chunk(2, dim=-1)
    torch.testing.assert_close(cpu.silu_mul(gu), F.silu(gate) * up, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("N", [1, 63, 64, 65, 1000, 49152])
def test_argmax_gives_torchs_index_with_ties_infinities_and_nan(N):
    """cpu.argmax is x.argmax(-1): the first index of each row's maximum, and a row holding NaN
    gives its first NaN, wherever in the row (and its 64-wide chunks) they fall."""
    g = torch.Generator().manual_seed(N)
    rows = [torch.randn(N, generator=g), torch.full((N,), -math.inf), torch.zeros(N)]
    x = torch.randn(N, generator=g).round()  # many ties of the maximum
    rows.append(x)
    for at in {0, N // 2, N - 1}:
        y = torch.randn(N, generator=g)
        y[at] = math.inf
        rows.append(y)
        z = torch.randn(N, generator=g)
        z[at] = math.nan
        z[N - 1 - at] = math.nan
        rows.append(z)
        w = torch.randn(N, generator=g)
        w[at] = w.max() + 1
        w[N - 1] = w[at]  # tied with the last element
        rows.append(w)
    m = torch.stack(rows)
    assert torch.equal(cpu.argmax(m), m.argmax(-1))
    assert torch.equal(cpu.argmax(m[:, :N]), m.argmax(-1))
    assert cpu.argmax(m).dtype == torch.long


def test_argmax_takes_torchs_path_for_what_the_kernels_do_not_take():
    x = torch.randn(3, 50)
    assert torch.equal(cpu.argmax(x.double()), x.double().argmax(-1))
    assert torch.equal(cpu.argmax(x[0]), x[0].argmax(-1))  # one dimension
    assert torch.equal(cpu.argmax(x.t()), x.t().argmax(-1))  # not contiguous


def test_silu_mul_rows_do_not_depend_on_how_many_share_the_call():
    """Rows run in parallel for prefill-sized inputs: each row's values are those it gets alone."""
    g = torch.Generator().manual_seed(2)
    gu = torch.randn(300, 2 * 1536, generator=g) * 4
    whole = cpu.silu_mul(gu)
    gate, up = gu.chunk(2, dim=-1)
    torch.testing.assert_close(whole, F.silu(gate) * up, rtol=1e-5, atol=1e-5)
    for m in (0, 17, 299):
        assert torch.equal(cpu.silu_mul(gu[m:m + 1]), whole[m:m + 1])


def test_rotate_store_matches_torch_rotary_and_writes_the_cache():
    nh, nkv, hd, n, P = 6, 2, 16, 70, 200
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(n, (nh + 2 * nkv) * hd, generator=g)
    cos, sin = _rope_tables(hd, P)
    pos = torch.randint(0, P, (n,), generator=g)
    slots = torch.randperm(150, generator=g)[:n]
    kc, vc = torch.zeros(150, nkv, hd), torch.zeros(150, nkv, hd)
    q = cpu.rotate_store(qkv, cos, sin, pos, slots, kc, vc, nh, nkv)
    qk = qkv[:, : (nh + nkv) * hd].view(n, nh + nkv, hd)
    ref = _rope(qk, pos, cos, sin)
    torch.testing.assert_close(q.view(n, nh, hd), ref[:, :nh], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kc[slots], ref[:, nh:], rtol=1e-5, atol=1e-5)
    assert torch.equal(vc[slots], qkv[:, (nh + nkv) * hd :].view(n, nkv, hd))
    untouched = torch.ones(150, dtype=torch.bool)
    untouched[slots] = False
    assert not kc[untouched].any() and not vc[untouched].any()


def _rope_tables(hd: int, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary cos and sin tables [P, hd] (base 10000), as the model builds them."""
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    emb = torch.cat([torch.outer(torch.arange(P, dtype=torch.float64), inv)] * 2, -1)
    return emb.cos().float(), emb.sin().float()


def _rope(x, pos, cos, sin):
    half = x.shape[-1] // 2
    c, s = cos[pos][:, None], sin[pos][:, None]
    return x * c + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * s


@pytest.mark.parametrize("nh,nkv,hd", [(4, 2, 16), (9, 3, 64), (2, 2, 24)])
def test_paged_attention_matches_reference(nh, nkv, hd):
    """Two sequences with scattered blocks, several new tokens each; K/V land in the right slots
    and every token attends causally to its own sequence only."""
    g = torch.Generator().manual_seed(nh * 100 + hd)
    slots, P = 96, 64
    cos, sin = _rope_tables(hd, P)
    kc = torch.randn(slots, nkv, hd, generator=g)
    vc = torch.randn(slots, nkv, hd, generator=g)
    # sequence 0: context 0..12, new tokens at 10, 11, 12; sequence 1: context 0..5, new token at 5
    perm = torch.randperm(slots, generator=g)
    ctx = torch.zeros(2, 13, dtype=torch.long)
    ctx[0] = perm[:13]
    ctx[1, :6] = perm[20:26]
    positions = torch.tensor([10, 11, 12, 5])
    token_seq = torch.tensor([0, 0, 0, 1])
    slot_mapping = torch.stack([ctx[0, 10], ctx[0, 11], ctx[0, 12], ctx[1, 5]])
    qkv = torch.randn(4, (nh + 2 * nkv) * hd, generator=g)
    scale = 1 / math.sqrt(hd)

    k_ref, v_ref = kc.clone(), vc.clone()
    q = qkv[:, : nh * hd].view(4, nh, hd)
    k = qkv[:, nh * hd : (nh + nkv) * hd].view(4, nkv, hd)
    v = qkv[:, (nh + nkv) * hd :].view(4, nkv, hd)
    q, k = _rope(q, positions, cos, sin), _rope(k, positions, cos, sin)
    k_ref[slot_mapping], v_ref[slot_mapping] = k, v
    want = []
    for t in range(4):
        n = int(positions[t]) + 1
        sl = ctx[token_seq[t], :n]
        keys = k_ref[sl].repeat_interleave(nh // nkv, dim=1).transpose(0, 1)  # [nh, n, hd]
        vals = v_ref[sl].repeat_interleave(nh // nkv, dim=1).transpose(0, 1)
        att = torch.softmax((keys @ q[t][:, :, None]).squeeze(-1) * scale, -1)  # [nh, n]
        want.append((att[:, None, :] @ vals).reshape(nh * hd))
    want = torch.stack(want)

    got = cpu.paged_attention(qkv, cos, sin, positions, token_seq, slot_mapping, ctx, kc, vc, nh, nkv, scale)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kc, k_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vc, v_ref)


@pytest.mark.parametrize("nh,nkv,hd", [(9, 3, 64), (4, 2, 24)])
def test_paged_attention_is_bitwise_independent_of_the_pass(nh, nkv, hd):
    """A verification pass of several tokens gives each token exactly what decoding it alone would
    (that keeps `binary` lossless): five tokens at once, against the same five one by one, each
    with its own context of a few hundred positions in scattered 16-slot blocks."""
    g = torch.Generator().manual_seed(7 + hd)
    P, n_ctx = 512, 300
    cos, sin = _rope_tables(hd, P)
    blocks = torch.randperm(P // 16, generator=g)
    ctx = (blocks[:, None] * 16 + torch.arange(16)).reshape(1, -1)[:, : n_ctx + 5]
    kc, vc = torch.randn(P, nkv, hd, generator=g), torch.randn(P, nkv, hd, generator=g)
    qkv = torch.randn(5, (nh + 2 * nkv) * hd, generator=g) * 3
    positions = torch.arange(n_ctx, n_ctx + 5)

    def run(rows, k, v):
        idx = torch.tensor(rows)
        return cpu.paged_attention(qkv[idx], cos, sin, positions[idx], torch.zeros(len(rows), dtype=torch.long),
                                   ctx[0, positions[idx]], ctx, k, v, nh, nkv, 1 / math.sqrt(hd))

    k1, v1, k2, v2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    together = run([0, 1, 2, 3, 4], k1, v1)
    alone = torch.cat([run([t], k2, v2) for t in range(5)])
    assert torch.equal(together, alone)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_linear_falls_back_for_large_or_bf16_inputs():
    w = torch.randn(8, 16)
    big = torch.randn(cpu.SKINNY_MAX_TOKENS + 1, 16)
    assert torch.equal(cpu.linear(big, w), F.linear(big, w))
    xb, wb = torch.randn(2, 16, dtype=torch.bfloat16), w.bfloat16()
    assert torch.equal(cpu.linear(xb, wb), F.linear(xb, wb))


# ------------------------------------------------------------------ oneDNN's GEMM for wide passes
needs_onednn = pytest.mark.skipif(not cpu.dense_available(), reason="torch without oneDNN, or VIA_SD_ONEDNN=0")


@needs_onednn
@pytest.mark.parametrize("M", [17, 64, 300])
@pytest.mark.parametrize("K,N", [(576, 1728), (1536, 576), (64, 9)])
def test_dense_linear_matches_torch_with_and_without_bias(M, K, N):
    g = torch.Generator().manual_seed(M + K + N)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    p = cpu.pack_dense(w)
    assert p.shape == w.shape and p.dtype == torch.float32
    torch.testing.assert_close(cpu.dense_linear(x, p), F.linear(x, w), rtol=1e-5, atol=2e-4)
    torch.testing.assert_close(cpu.dense_linear(x, p, b), F.linear(x, w, b), rtol=1e-5, atol=2e-4)


@needs_onednn
def test_dense_linear_rows_do_not_depend_on_the_other_rows_of_the_pass():
    """A prompt's chunk, or a batch of sequences, computes each row as it would in any other
    wide pass (the skinny kernel's property, for the passes it does not take)."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(300, 576, generator=g), torch.randn(1728, 576, generator=g)
    p = cpu.pack_dense(w)
    whole = cpu.dense_linear(x, p)
    for a, b in ((0, 17), (17, 50), (123, 300), (3, 280)):
        assert torch.equal(cpu.dense_linear(x[a:b], p), whole[a:b])


def test_dense_path_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(cpu, "_ONEDNN", False)
    monkeypatch.delitem(cpu._state, "dense", raising=False)
    assert not cpu.dense_available()
    monkeypatch.delitem(cpu._state, "dense", raising=False)  # the next caller measures again


def _greedy_head(w: torch.Tensor):
    from server.engine.model import GreedyHead

    head = GreedyHead.build(w)
    assert head is not None
    return head


@pytest.mark.parametrize("M", [1, 2, 5, 17])
def test_greedy_linear_argmax_is_the_fp32_argmax(M):
    """The fp16 read of the LM head: recomputed rows bitwise the fp32 pass's, every other entry
    below the row's maximum, so the argmax is the fp32 pass's."""
    g = torch.Generator().manual_seed(M)
    w = torch.randn(3001, 576, generator=g) * 0.05
    head = _greedy_head(w)
    for t in range(20):
        x = torch.randn(M, 576, generator=g) * (1 + t)
        ref = cpu.skinny_linear(x, w)
        out, ids = cpu.greedy_linear(x, head.w16, head.w, head.row_err)
        assert 0 < len(ids) <= 64
        assert torch.equal(out.argmax(-1), ref.argmax(-1))
        assert torch.equal(out[:, ids], ref[:, ids])
        assert torch.equal(head.logits(x).argmax(-1), ref.argmax(-1))


def test_greedy_linear_separates_rows_that_fp16_cannot():
    """Rows equal in fp16 and a hair apart in fp32: both are candidates and the exact sums decide."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(500, 576, generator=g) * 0.05
    x = torch.randn(2, 576, generator=g)
    top = 3
    w[top] = (2 * x[0] / x[0].norm()).half().float()  # the clear winner for x[0], exact in fp16
    for j, sign in ((11, 1.0), (12, -1.0)):  # just above and just below it, far below fp16's step
        w[j] = w[top] + sign * 1e-5 * w[top].abs() * x[0].sign()
    head = _greedy_head(w)
    assert torch.equal(head.w16[11], head.w16[top]) and torch.equal(head.w16[12], head.w16[top])
    ref = cpu.skinny_linear(x, w)
    out, ids = cpu.greedy_linear(x, head.w16, head.w, head.row_err)
    assert {11, 12, top} <= set(ids.tolist())
    assert int(ref[0].argmax()) == 11 and int(out[0].argmax()) == 11
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_greedy_linear_falls_back_to_fp32_on_a_non_finite_row():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 64, generator=g)
    head = _greedy_head(w)
    x = torch.randn(3, 64, generator=g)
    x[1, 5] = float("inf")
    out, ids = cpu.greedy_linear(x, head.w16, head.w, head.row_err)
    assert len(ids) == 0
    torch.testing.assert_close(out, cpu.skinny_linear(x, w), rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------- Q4_1 blocks


def q4_1_matrix(N: int, K: int, g: torch.Generator) -> torch.Tensor:
    """fp32 [N, K] that is exactly Q4_1 blocks, as GGUF's own quantizer and dequantizer leave it."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    w = torch.randn(N, K, generator=g) * 0.05
    q = quantize(w.numpy(), GGMLQuantizationType.Q4_1)
    return torch.from_numpy(dequantize(q, GGMLQuantizationType.Q4_1).reshape(N, K).astype("float32").copy())


@pytest.mark.parametrize("K", [32, 576, 1536])
def test_q4_1_pack_reproduces_gguf_blocks_exactly(K):
    from via_sd_kernels.cpu import blocks

    w = q4_1_matrix(37, K, torch.Generator().manual_seed(K))
    w[3, :32] = 0.25  # a constant block (d = 0)
    p = blocks.pack_q4_1(w)
    assert p is not None and p.dtype == torch.uint8 and p.shape == (37, K // 32 * 20)
    assert torch.equal(blocks.unpack_q4_1(p, K), w)


def test_q4_1_pack_refuses_what_is_not_q4_1():
    from via_sd_kernels.cpu import blocks

    g = torch.Generator().manual_seed(0)
    assert blocks.pack_q4_1(torch.randn(8, 64, generator=g)) is None  # 32 distinct values a block
    assert blocks.pack_q4_1(q4_1_matrix(8, 64, g)[:, :40].contiguous()) is None  # K not a multiple of 32
    w = q4_1_matrix(8, 64, g)
    w[2, 5] = float("nan")
    assert blocks.pack_q4_1(w) is None
    w = q4_1_matrix(8, 64, g)
    w[1, 7] += 1e-3  # one value off the block's grid
    assert blocks.pack_q4_1(w) is None
    assert blocks.pack_q4_1(q4_1_matrix(8, 64, g).half()) is None


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 19, 32])
@pytest.mark.parametrize("K,N", [(576, 131), (1536, 77), (64, 9)])
def test_skinny_linear_q4_1_is_bitwise_the_fp32_matrix(M, K, N):
    """Packed weights give the fp32 pass's values exactly, for every pass size and row tail."""
    from via_sd_kernels.cpu import blocks

    g = torch.Generator().manual_seed(M * 7 + K + N)
    w = q4_1_matrix(N, K, g)
    x, r = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
    p = blocks.pack_q4_1(w)
    assert torch.equal(cpu.skinny_linear(x, p), cpu.skinny_linear(x, w))
    assert torch.equal(cpu.skinny_linear(x, p, r), cpu.skinny_linear(x, w, r))
    torch.testing.assert_close(cpu.skinny_linear(x, p), F.linear(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("K", [32, 576, 1536])
def test_q4_1_interleaving_is_a_permutation_of_the_blocks(K):
    from via_sd_kernels.cpu import blocks

    p = blocks.pack_q4_1(q4_1_matrix(24, K, torch.Generator().manual_seed(K)))
    q = blocks.interleave_q4_1(p, K)
    assert q.dtype == torch.uint8 and q.shape == (6, K // 32 * 96)
    assert torch.equal(blocks.deinterleave_q4_1(q, K), p)
    # group 1 (rows 4-7), block 0: byte 4 i + r is row 4 + r's quant byte i; then d and m in fp32
    g = q[1, :96]
    for r in range(4):
        row = p[4 + r, :20]
        assert torch.equal(g[torch.arange(16) * 4 + r], row[4:20])
        assert g[64 + 4 * r:68 + 4 * r].view(torch.float32).item() == row[0:2].view(torch.float16).item()
        assert g[80 + 4 * r:84 + 4 * r].view(torch.float32).item() == row[2:4].view(torch.float16).item()
    assert blocks.interleave_q4_1(p[:23], K) is None  # rows not a multiple of 4


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 19])
@pytest.mark.parametrize("K,N", [(576, 132), (1536, 76), (64, 12), (32, 4)])
def test_skinny_linear_on_interleaved_q4_1_is_bitwise_the_fp32_matrix(M, K, N):
    """Four rows' blocks interleaved: the same sums as the GGUF layout and the fp32 matrix, for every
    pass size and tile (8, 4 and 2 rows, and a tail of rows after the last whole tile)."""
    from via_sd_kernels.cpu import blocks

    g = torch.Generator().manual_seed(M * 11 + K + N)
    w = q4_1_matrix(N, K, g)
    x, r = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
    q = blocks.interleave_q4_1(blocks.pack_q4_1(w), K)
    assert torch.equal(cpu.skinny_linear(x, q), cpu.skinny_linear(x, w))
    assert torch.equal(cpu.skinny_linear(x, q, r), cpu.skinny_linear(x, w, r))
    for m in range(M):  # each token's row as if alone in its pass
        assert torch.equal(cpu.skinny_linear(x[m:m + 1], q), cpu.skinny_linear(x, w)[m:m + 1])


def test_skinny_linear_rejects_a_q4_1_matrix_of_the_wrong_width():
    from via_sd_kernels.cpu import blocks

    p = blocks.pack_q4_1(q4_1_matrix(16, 64, torch.Generator().manual_seed(1)))
    with pytest.raises(RuntimeError, match="Q4_1"):
        cpu.skinny_linear(torch.randn(2, 96), p)


def q8_0_matrix(N: int, K: int, g: torch.Generator) -> torch.Tensor:
    """fp32 [N, K] that is exactly Q8_0 blocks, as GGUF's quantizer and dequantizer leave it."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    q = quantize((torch.randn(N, K, generator=g) * 0.05).numpy(), GGMLQuantizationType.Q8_0)
    return torch.from_numpy(dequantize(q, GGMLQuantizationType.Q8_0).reshape(N, K).astype("float32").copy())


def test_q8_0_pack_reproduces_gguf_blocks_exactly_and_refuses_others():
    from via_sd_kernels.cpu import blocks

    g = torch.Generator().manual_seed(3)
    w = q8_0_matrix(41, 576, g)
    w[5, 32:64] = 0.0
    p = blocks.pack_q8_0(w)
    assert p is not None and p.dtype == torch.int8 and p.shape == (41, 18 * 34)
    assert torch.equal(blocks.unpack_q8_0(p, 576), w)
    assert blocks.pack(w).dtype == torch.int8  # not Q4_1: the next form
    assert blocks.pack_q8_0(torch.randn(4, 64, generator=g)) is None
    w[0, 0] += 1e-4
    assert blocks.pack_q8_0(w) is None


def test_quantize_q8_0_keeps_exact_blocks_and_rounds_others_to_half_a_step():
    from via_sd_kernels.cpu import blocks

    g = torch.Generator().manual_seed(4)
    exact = q8_0_matrix(9, 64, g)
    assert torch.equal(blocks.quantize_q8_0(exact), blocks.pack_q8_0(exact))
    w = torch.randn(37, 96, generator=g) * 0.1
    w[3, :32] = 0.0  # an all-zero block: d = 0, q = 0
    w[4, 40] = 5.0  # one large value: the rest of its block rounds coarsely
    p = blocks.quantize_q8_0(w)
    assert p.dtype == torch.int8 and p.shape == (37, 3 * 34)
    back = blocks.unpack_q8_0(p, 96)
    d = p.reshape(-1, 34)[:, :2].contiguous().view(torch.float16).float().reshape(37, 3)
    err = (back - w).abs().reshape(37, 3, 32)
    assert (err <= d[..., None] / 2 * (1 + 1e-6)).all()
    assert torch.equal(back[3, :32], torch.zeros(32))
    assert back[4, 40] == pytest.approx(5.0, rel=1e-3)
    assert (err.amax(-1) > 0).any()  # it is a rounding, not a copy
    for bad in (torch.randn(3, 40), torch.zeros(0, 32)):
        with pytest.raises(ValueError):
            blocks.quantize_q8_0(bad)
    with pytest.raises(ValueError, match="non-finite"):
        blocks.quantize_q8_0(torch.full((1, 32), float("nan")))


@pytest.mark.parametrize("M", [1, 2, 4, 6, 8, 11])
def test_skinny_linear_q8_0_is_bitwise_the_fp32_matrix(M):
    from via_sd_kernels.cpu import blocks

    g = torch.Generator().manual_seed(M)
    w = q8_0_matrix(203, 576, g)
    x, r = torch.randn(M, 576, generator=g), torch.randn(M, 203, generator=g)
    p = blocks.pack_q8_0(w)
    assert torch.equal(cpu.skinny_linear(x, p), cpu.skinny_linear(x, w))
    assert torch.equal(cpu.skinny_linear(x, p, r), cpu.skinny_linear(x, w, r))


# ------------------------------------------------------------------ the fp16 K/V cache
def test_rotate_store_into_an_fp16_cache_rounds_the_fp32_values_once():
    nh, nkv, hd, n, P = 6, 2, 16, 40, 100
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(n, (nh + 2 * nkv) * hd, generator=g) * 4
    cos, sin = _rope_tables(hd, P)
    pos = torch.randint(0, P, (n,), generator=g)
    slots = torch.randperm(80, generator=g)[:n]
    k32, v32 = torch.zeros(80, nkv, hd), torch.zeros(80, nkv, hd)
    k16, v16 = torch.zeros(80, nkv, hd, dtype=torch.float16), torch.zeros(80, nkv, hd, dtype=torch.float16)
    q32 = cpu.rotate_store(qkv, cos, sin, pos, slots, k32, v32, nh, nkv)
    q16 = cpu.rotate_store(qkv, cos, sin, pos, slots, k16, v16, nh, nkv)
    assert torch.equal(q16, q32)  # the queries stay fp32
    assert torch.equal(k16, k32.half()) and torch.equal(v16, v32.half())
    with pytest.raises(RuntimeError, match="fp32 or fp16"):
        cpu.rotate_store(qkv, cos, sin, pos, slots, k16, v32, nh, nkv)
    with pytest.raises(RuntimeError, match="fp32 or fp16"):
        cpu.rotate_store(qkv, cos, sin, pos, slots, k16.bfloat16(), v16.bfloat16(), nh, nkv)


@pytest.mark.parametrize("nh,nkv,hd", [(9, 3, 64), (4, 2, 24), (2, 1, 40)])
def test_paged_attention_on_an_fp16_cache_is_the_fp32_kernel_on_the_rounded_values(nh, nkv, hd):
    """The fp16 cache changes nothing but the stored values: attention over it is bitwise the fp32
    kernel's over an fp32 cache holding the same (rounded) keys and values. And it stays
    independent of the pass, so `binary` is still lossless against `off` on the same cache type."""
    g = torch.Generator().manual_seed(11 + hd)
    P, n_ctx = 512, 300
    cos, sin = _rope_tables(hd, P)
    blocks = torch.randperm(P // 16 - 1, generator=g)
    ctx = (blocks[:, None] * 16 + torch.arange(16)).reshape(1, -1)[:, : n_ctx + 5]
    spare = torch.arange(P - 16, P - 11)  # a block outside every context
    k16 = torch.randn(P, nkv, hd, generator=g).half()
    v16 = torch.randn(P, nkv, hd, generator=g).half()
    qkv = torch.randn(5, (nh + 2 * nkv) * hd, generator=g) * 3
    positions = torch.arange(n_ctx, n_ctx + 5)
    scale = 1 / math.sqrt(hd)

    def run(rows, k, v, slots=None):
        idx = torch.tensor(rows)
        where = ctx[0, positions[idx]] if slots is None else slots[idx]
        return cpu.paged_attention(qkv[idx], cos, sin, positions[idx], torch.zeros(len(rows), dtype=torch.long),
                                   where, ctx, k, v, nh, nkv, scale)

    ka, va = k16.clone(), v16.clone()
    got = run([0, 1, 2, 3, 4], ka, va)
    # the fp32 kernel over the fp16 call's cache, widened; its own stores go to the spare block
    k32, v32 = ka.float(), va.float()
    want = run([0, 1, 2, 3, 4], k32, v32, spare)
    assert torch.equal(got, want)
    assert torch.equal(k32[ctx[0]], ka[ctx[0]].float())  # the contexts were not written by the fp32 call
    kb, vb = k16.clone(), v16.clone()
    alone = torch.cat([run([t], kb, vb) for t in range(5)])
    assert torch.equal(got, alone) and torch.equal(ka, kb) and torch.equal(va, vb)


@pytest.mark.parametrize("nh,nkv,hd", [(9, 3, 64), (4, 2, 24)])
@pytest.mark.parametrize("half", [False, True])
def test_paged_attention_over_long_contexts_is_bitwise_the_same_on_either_path(nh, nkv, hd, half):
    """Past 1,024 positions a pass of few tokens runs in phases split between the threads (scores
    by blocks of keys, softmax by query, p @ V by column block) instead of one work item per KV
    head. A token's output must not depend on which path its pass took: a prompt's chunk (70
    tokens, the item path), the same tokens as a 65-token chunk then a 5-token verification pass
    (phased), one at a time (phased), and beside another sequence's decode token in one pass."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(13 + hd)
        P, n0, n1, new = 1536, 1130, 300, 70
        cos, sin = _rope_tables(hd, P)
        blocks = torch.randperm(P // 16, generator=g)
        slots = (blocks[:, None] * 16 + torch.arange(16)).reshape(-1)
        ctx = torch.zeros(2, n0 + new, dtype=torch.long)
        ctx[0] = slots[: n0 + new]
        ctx[1, : n1 + 1] = slots[n0 + new : n0 + new + n1 + 1]
        kc, vc = torch.randn(P, nkv, hd, generator=g), torch.randn(P, nkv, hd, generator=g)
        if half:
            kc, vc = kc.half(), vc.half()
        qkv = torch.randn(new + 1, (nh + 2 * nkv) * hd, generator=g) * 3
        positions = torch.cat([torch.arange(n0, n0 + new), torch.tensor([n1])])
        seqs = torch.tensor([0] * new + [1])
        where = torch.cat([ctx[0, n0 : n0 + new], ctx[1, n1 : n1 + 1]])

        def run(rows, k, v):
            idx = torch.tensor(rows)
            return cpu.paged_attention(qkv[idx], cos, sin, positions[idx], seqs[idx], where[idx], ctx, k, v, nh, nkv,
                                       1 / math.sqrt(hd))

        caches = [(kc.clone(), vc.clone()) for _ in range(4)]
        wide = run(list(range(new)), *caches[0])  # items
        run(list(range(new - 5)), *caches[1])
        verify = run(list(range(new - 5, new)), *caches[1])  # phased
        run(list(range(new - 5)), *caches[2])
        alone = torch.cat([run([t], *caches[2]) for t in range(new - 5, new)])
        run(list(range(new - 5)), *caches[3])
        mixed = run([*range(new - 5, new), new], *caches[3])  # two sequences in one phased pass
        other = run([new], kc.clone(), vc.clone())
        assert torch.equal(verify, wide[new - 5 :])
        assert torch.equal(alone, wide[new - 5 :])
        assert torch.equal(mixed[:5], wide[new - 5 :]) and torch.equal(mixed[5:], other)
        for k, v in caches[1:]:
            assert torch.equal(k[ctx[0]], caches[0][0][ctx[0]]) and torch.equal(v[ctx[0]], caches[0][1][ctx[0]])
    finally:
        torch.set_num_threads(threads)
