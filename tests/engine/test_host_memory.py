"""Weights and KV cache in huge pages: same values, alignment, tied tensors stay tied."""

from __future__ import annotations

import pytest
import torch

from server.engine import host_memory
from server.engine.kv_cache import KVCache
from server.engine.model import LlamaModel

needs_huge = pytest.mark.skipif(not host_memory.available(), reason="no MADV_HUGEPAGE here")


@needs_huge
def test_move_keeps_values_aligns_and_dedups():
    a, b = torch.randn(300, 7), torch.arange(11, dtype=torch.int64)
    out = host_memory.move_to_huge_pages([a, b, a])
    assert torch.equal(out[0], a) and torch.equal(out[1], b)
    assert out[0] is out[2]  # one copy of a tensor given twice (tied embeddings)
    assert out[0].data_ptr() % host_memory.HUGE_PAGE == 0
    assert all(t.data_ptr() % host_memory.ALIGN == 0 for t in out)
    assert out[0].data_ptr() != a.data_ptr()
    out[0][0, 0] = 123.0  # writable, and separate from the original
    assert a[0, 0] != 123.0


@needs_huge
def test_zeros_are_zero_and_disjoint():
    ts = host_memory.zeros([(5, 3, 4), (5, 3, 4)], torch.float32)
    assert all(t.shape == (5, 3, 4) and not t.any() for t in ts)
    ts[0].fill_(1.0)
    assert not ts[1].any()


def test_switch_off_keeps_ordinary_tensors(monkeypatch):
    monkeypatch.setenv("VIA_SD_HUGE_PAGES", "0")
    a = torch.randn(4, 4)
    assert host_memory.move_to_huge_pages([a])[0] is a
    assert host_memory.zeros([(2, 2)], torch.float32)[0].shape == (2, 2)


@needs_huge
def test_model_and_cache_load_into_huge_pages(tiny_model_dir, monkeypatch):
    m = LlamaModel.from_folder(tiny_model_dir)
    assert m.embed.data_ptr() % host_memory.ALIGN == 0
    assert m.lm_head is m.embed  # tied weights stay one tensor
    monkeypatch.setenv("VIA_SD_HUGE_PAGES", "0")
    plain = LlamaModel.from_folder(tiny_model_dir)
    for lw, pw in zip(m.layers, plain.layers):
        assert torch.equal(lw.w_gate_up, pw.w_gate_up) and torch.equal(lw.wqkv, pw.wqkv)
    cache = KVCache(m.cfg, 8, 4, torch.float32)
    assert len(cache.k) == len(cache.v) == m.cfg.num_layers and not cache.k[0].any()
