"""The packed GGUF blocks are kept between loads: the same tensors come back without being found
again, and a changed model, a damaged or foreign file and an unwritable cache all fall back to
finding them."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.engine import model as model_mod
from server.engine.model import LlamaModel, packed_cache_path
from server.engine.testing import write_tiny_model
from via_sd_kernels import cpu as cpu_kernels
from via_sd_kernels.cpu import blocks

pytestmark = pytest.mark.skipif(not (cpu_kernels.available() and model_mod.PACKED_WEIGHTS),
                                reason="packed weights need the CPU kernels")


def gguf_exact(w: torch.Tensor, kind: str) -> torch.Tensor:
    """w as GGUF's quantizer and dequantizer leave it: exactly Q4_1 or Q8_0 blocks."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    t = getattr(GGMLQuantizationType, kind)
    return torch.from_numpy(dequantize(quantize(w.numpy(), t), t).reshape(w.shape).astype("float32").copy())


@pytest.fixture
def blocks_dir(tmp_path, monkeypatch):
    """A tiny model whose layer matrices are Q4_1 blocks and whose (tied) embedding is Q8_0 blocks,
    as a GGUF conversion leaves them; the model cache in tmp_path."""
    monkeypatch.setenv("VIA_SD_CACHE", str(tmp_path / "cache"))
    folder = write_tiny_model(tmp_path / "m")
    f = folder / "model.safetensors"
    t = load_file(str(f))
    for k, v in t.items():
        if v.dim() == 2:
            t[k] = gguf_exact(v, "Q8_0" if "embed" in k else "Q4_1")
    save_file(t, str(f))
    return folder


def gguf_layout(lw, f: str) -> torch.Tensor:
    """A layer's packed matrix in GGUF's layout (the engine reads it four rows interleaved)."""
    p = lw.packed[f]
    K = getattr(lw, f).shape[1]
    return p if p.shape[1] == K // blocks.BLOCK * blocks.Q4_1_BYTES else blocks.deinterleave_q4_1(p, K)


def packed_of(m: LlamaModel):
    return [{f: p.clone() for f, p in lw.packed.items()} for lw in m.layers], m.lm_head_packed.clone()


def test_packed_blocks_are_kept_between_loads(blocks_dir, monkeypatch):
    first = LlamaModel.from_folder(blocks_dir)
    layers, head = packed_of(first)
    assert [len(p) for p in layers] == [4] * first.cfg.num_layers and head.dtype == torch.int8
    path = packed_cache_path(blocks_dir)
    assert path.is_file() and path.parent.parent == blocks_dir.parent / "cache"
    saved = load_file(str(path))  # GGUF's layout in the file, whatever the engine reads
    assert all(torch.equal(saved[f"layers.{i}.{f}"], gguf_layout(lw, f))
               for i, lw in enumerate(first.layers) for f in lw.packed)
    assert any(p.shape[1] % 96 == 0 and p.shape[0] * 4 == getattr(lw, f).shape[0]
               for lw in first.layers for f, p in lw.packed.items())  # and the engine reads them interleaved

    def refuse(*a, **k):
        raise AssertionError("the blocks were found again instead of read from the cache")

    monkeypatch.setattr(blocks, "pack_q4_1", refuse)
    monkeypatch.setattr(blocks, "pack", refuse)
    again = LlamaModel.from_folder(blocks_dir)
    got, got_head = packed_of(again)
    assert [p.keys() for p in got] == [p.keys() for p in layers]
    assert all(torch.equal(a[f], b[f]) for a, b in zip(got, layers) for f in a)
    assert torch.equal(got_head, head)


def test_a_damaged_or_foreign_cache_is_found_again_and_rewritten(blocks_dir):
    fresh_layers, fresh_head = packed_of(LlamaModel.from_folder(blocks_dir))
    path = packed_cache_path(blocks_dir)
    good = path.read_bytes()

    def same_as_fresh(m):
        layers, head = packed_of(m)
        return all(torch.equal(a[f], b[f]) for a, b in zip(layers, fresh_layers) for f in b) and torch.equal(head, fresh_head)

    path.write_bytes(b"not a safetensors file")
    assert same_as_fresh(LlamaModel.from_folder(blocks_dir)) and path.read_bytes() == good

    # a well-formed file with another matrix's blocks under a name: its rows do not unpack to the model's
    t = load_file(str(path))
    other = gguf_exact(torch.randn(t["layers.0.wo"].shape[0], 64) * 0.05, "Q4_1")
    t["layers.0.wo"] = blocks.pack_q4_1(other)
    save_file(t, str(path), metadata={"via_sd_packed": str(model_mod.PACKED_CACHE_VERSION)})
    assert same_as_fresh(LlamaModel.from_folder(blocks_dir)) and path.read_bytes() == good

    save_file(load_file(str(path)), str(path), metadata={"via_sd_packed": "0"})  # an older layout
    assert same_as_fresh(LlamaModel.from_folder(blocks_dir)) and path.read_bytes() == good


def test_changed_weights_miss_the_cache(blocks_dir):
    LlamaModel.from_folder(blocks_dir)
    before = packed_cache_path(blocks_dir)
    f = blocks_dir / "model.safetensors"
    t = load_file(str(f))
    t["model.layers.0.self_attn.o_proj.weight"] = gguf_exact(torch.randn_like(t["model.layers.0.self_attn.o_proj.weight"]) * 0.05, "Q4_1")
    save_file(t, str(f))
    after = packed_cache_path(blocks_dir)
    assert after != before
    m = LlamaModel.from_folder(blocks_dir)
    assert torch.equal(gguf_layout(m.layers[0], "wo"), blocks.pack_q4_1(t["model.layers.0.self_attn.o_proj.weight"]))
    assert after.is_file()


def test_an_unwritable_cache_or_a_model_without_blocks_writes_nothing(blocks_dir, tmp_path, monkeypatch):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    monkeypatch.setenv("VIA_SD_CACHE", str(not_a_dir))
    m = LlamaModel.from_folder(blocks_dir)
    assert len(m.layers[0].packed) == 4 and m.lm_head_packed is not None
    monkeypatch.setenv("VIA_SD_CACHE", str(tmp_path / "cache2"))
    random_model = write_tiny_model(tmp_path / "random")
    m = LlamaModel.from_folder(random_model)
    assert m.layers[0].packed == {} and m.lm_head_packed is None
    assert not (tmp_path / "cache2").exists()


def test_wide_passes_read_ggufs_rows_where_the_kernels_read_them_faster(blocks_dir, monkeypatch):
    """Where the host's kernels read GGUF's layout faster from some width on (AVX2 hosts, from 3
    tokens), the layers keep it beside the interleaved one and passes that wide read it: the same
    values, so every logprob is bitwise the one the interleaved layout gives."""
    from server.engine.model import LayerWeights
    from tests.engine.helpers import assert_pool_full, greedy_requests, make_engine

    flags = open("/proc/cpuinfo").read() if sys.platform == "linux" else ""
    avx2_only = " avx2" in flags and " fma" in flags and " avx512f" not in flags
    assert cpu_kernels.rows_layout_from() == (3 if avx2_only else 0)
    monkeypatch.setattr(cpu_kernels, "rows_layout_from", lambda: 3)  # on every host
    read = []
    small = LayerWeights.small

    def spy(self, name, tokens=1):
        w = small(self, name, tokens)
        read.append((tokens, "rows" if w is self.rows.get(name) else "interleaved" if w is self.packed.get(name) else "fp32"))
        return w

    monkeypatch.setattr(LayerWeights, "small", spy)
    eng = make_engine(blocks_dir)
    for lw in eng.model.layers:
        assert lw.rows_from == 3 and lw.rows.keys() == lw.packed.keys() == set(LayerWeights.PACKABLE)
        for f in lw.rows:
            assert torch.equal(lw.rows[f], gguf_layout(lw, f)) and lw.packed[f].shape[1] % 96 == 0
    prompts = [[5, 9, 14, 3, 22, 7, 11, 30][: n] for n in (2, 5, 8)]  # prompts of 2, 5 and 8 tokens
    both = {}
    for rows_from in (3, 0):
        for lw in eng.model.layers:
            lw.rows_from = rows_from
        eng.model.weights_changed()
        read.clear()
        # one request at a time: its decode steps are one-token passes, its prompt one pass
        both[rows_from] = [eng.generate(greedy_requests([p], 6, mode="off", prefix=f"w{rows_from}.{i}", logprobs=3))[0]
                           for i, p in enumerate(prompts)]
        assert_pool_full(eng)
        wide = {r for t, r in read if t >= 3}
        assert {r for t, r in read if t < 3} == {"interleaved"}
        assert wide == ({"rows"} if rows_from else {"interleaved"})
    for a, b in zip(both[3], both[0]):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs and a.logprobs
