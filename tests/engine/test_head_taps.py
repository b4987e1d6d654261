"""A draft head that reads low- and mid-level features (EAGLE-3's taps): the model returns the
tapped layers' outputs, a three-tier full pass that starts from the slim prefix gets the taps it
skips from the slim pass, the head fuses them, and the engine stays lossless with such a head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from server.engine.drafters.head import DraftHead, draft
from server.engine.kv_cache import Chunk, build_batch
from server.engine.model import LlamaModel
from tests.engine.helpers import assert_pool_full, greedy_requests, make_engine, prefilled_two_tables
from tests.engine.test_head import random_head, window_of
from via_sd_kernels import cpu
from via_sd_kernels.routes import Route

TAPS = (0, 2, 3)


def _step(model: LlamaModel, route=None, **kw):
    """Two prompts prefilled, then one decode-sized pass (4 tokens and 1) with taps."""
    kv, t1, t2 = prefilled_two_tables(model)
    with torch.inference_mode():
        return model.forward(build_batch([Chunk(t1, 37, [7, 8, 9, 10], 4), Chunk(t2, 11, [12], 1)]), kv.k, kv.v,
                             route, want_hidden=True, **kw)


def _norm(model: LlamaModel, x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), model.norm, model.cfg.rms_norm_eps)


@pytest.mark.parametrize("kernels", [True, False])
def test_taps_are_the_outputs_of_their_layers(tiny_model_dir, kernels):
    """Tap i is the residual stream after layer i: the final norm of the last layer's tap is the
    hidden state, and the final norm of tap i is what a pass that stops after layer i returns."""
    model = LlamaModel.from_folder(tiny_model_dir)
    n = model.cfg.num_layers
    with cpu.disabled() if not kernels else _nothing():
        out = _step(model, taps=TAPS)
        assert out.taps.shape == (5, len(TAPS), model.cfg.hidden_size)
        torch.testing.assert_close(_norm(model, out.taps[:, -1]), out.hidden, rtol=1e-5, atol=1e-5)
        for j, i in enumerate(TAPS[:-1]):
            upto = Route(num_layers=n, attn=tuple(k <= i for k in range(n)), mlp=tuple(k <= i for k in range(n)))
            cut = _step(model, upto)
            torch.testing.assert_close(_norm(model, out.taps[:, j]), cut.hidden, rtol=1e-4, atol=1e-4)
        assert _step(model).taps is None  # nothing asked, nothing returned
    if kernels:
        with cpu.disabled():
            ref = _step(model, taps=TAPS)
        torch.testing.assert_close(out.taps, ref.taps, rtol=1e-4, atol=1e-4)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_full_pass_from_the_slim_prefix_takes_the_taps_below_it(tiny_model_dir):
    """The three-tier full pass that starts at the slim route's first skipped sub-layer does not
    run the layers below it: their taps come from the slim pass (the same layers, the same
    inputs), and every tap equals a full pass's from the first layer."""
    model = LlamaModel.from_folder(tiny_model_dir)
    n = model.cfg.num_layers
    slim = Route(num_layers=n, attn=(True,) * n, mlp=tuple(k != 2 for k in range(n)))  # first skip: sub-layer 5
    start = 5
    ref = _step(model, taps=TAPS)
    kv, t1, t2 = prefilled_two_tables(model)
    chunks = [Chunk(t1, 37, [7, 8, 9, 10], 4), Chunk(t2, 11, [12], 1)]
    with torch.inference_mode():
        s = model.forward(build_batch(chunks), kv.k, kv.v, slim, save_at=start, want_hidden=True, taps=TAPS)
        with pytest.raises(ValueError, match="start_taps"):
            model.forward(build_batch(chunks), kv.k, kv.v, start_sublayer=start, start_hidden=s.prefix_hidden,
                          want_hidden=True, taps=TAPS)
        full = model.forward(build_batch(chunks), kv.k, kv.v, start_sublayer=start, start_hidden=s.prefix_hidden,
                             want_hidden=True, taps=TAPS, start_taps=s.taps)
    torch.testing.assert_close(full.taps, ref.taps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(full.hidden, ref.hidden, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(s.taps[:, 1], ref.taps[:, 1], atol=1e-3)  # the slim pass's own layer-2 tap differs


def test_head_with_taps_fuses_them_and_starts_as_the_head_it_grew_from(tmp_path):
    V, H, W = 300, 64, 6
    embed = torch.randn(V, H)
    base = random_head(H, V, seed=5, window=W).attach(embed, embed)
    grown = base.with_taps((1, 4)).attach(embed, embed)
    assert grown.taps == (1, 4) and grown.fc_taps.weight.shape == (H, 3 * H)
    torch.manual_seed(6)
    T, t = 12, 9
    h, x = torch.randn(T, H), torch.randint(0, V, (T,))
    wide = torch.cat([torch.randn(T, 2 * H), h], dim=-1)  # the taps, then the final-norm state
    with torch.no_grad():
        assert grown.fuse_taps(wide).shape == (T, H) and grown.fuse_taps(h) is h
        ids, probs = draft(base, *window_of(h, x, t, W), 4)
        ids_g, probs_g = draft(grown, *window_of(wide, x, t, W), 4)
    assert torch.equal(ids, ids_g)  # the identity fusion drafts as the head it grew from
    torch.testing.assert_close(probs, probs_g, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        grown.fc_taps.weight.add_(0.5 * torch.randn_like(grown.fc_taps.weight))
        moved, _ = draft(grown, *window_of(wide, x, t, W), 4)
        again, _ = draft(grown, *window_of(wide, x, t, W), 4)
    assert torch.equal(moved, again)  # deterministic
    assert set(moved.flatten().tolist()) <= set(grown.reduced_ids.tolist())
    grown.save(tmp_path / "g.safetensors", {"threshold": 0.0})
    loaded, info = DraftHead.load(tmp_path / "g.safetensors")
    assert loaded.taps == (1, 4) and info["taps"] == [1, 4]
    for (k, a), b in zip(grown.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a.half().float(), b, msg=k)  # saved in fp16


@pytest.fixture(scope="module")
def taps_head_path(tiny_model_dir, tmp_path_factory):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    head = random_head(cfg["hidden_size"], cfg["vocab_size"], seed=2).with_taps((0, 2))
    with torch.no_grad():
        head.fc_taps.weight.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("taps") / "taps.head.safetensors"
    head.save(path, {"threshold": 0.0, "min_tokens": 1})
    return path


@pytest.mark.parametrize("drafter", ["head", "hybrid"])
def test_engine_with_a_taps_head_is_lossless_and_feeds_it_the_taps(tiny_model_dir, taps_head_path, drafter):
    prompts = [[1, 2, 3, 4, 5], [10, 20, 30], list(range(40, 70)), [7, 7, 8, 7, 7, 8, 7]]
    eng = make_engine(tiny_model_dir, spec={"drafter": drafter, "head_path": str(taps_head_path),
                                            "adaptive_draft": False})
    assert eng.runner.taps == (0, 2)
    seen, starts = [], []
    head = eng.spec.drafter.head if drafter == "head" else eng.spec.drafter.head.head
    real_observe, real_forward = type(eng.spec.drafter).observe, eng.model.forward

    def observe(seq, hidden, tokens=None):
        seen.append(None if hidden is None else hidden.shape[-1])
        return real_observe(eng.spec.drafter, seq, hidden, tokens)

    def forward(*a, **kw):
        if kw.get("start_sublayer", 0) > 0 and kw.get("start_taps") is not None:
            # the same pass from the first layer (it rewrites the same K/V) gives the same taps
            scratch = {k: v for k, v in kw.items() if k not in ("start_sublayer", "start_hidden", "start_taps")}
            ref = real_forward(*a, **scratch)
            out = real_forward(*a, **kw)
            torch.testing.assert_close(out.taps, ref.taps, rtol=1e-4, atol=1e-4)
            starts.append(True)
            return out
        return real_forward(*a, **kw)

    eng.spec.drafter.observe = observe
    eng.model.forward = forward
    off = [r.token_ids for r in eng.generate(greedy_requests(prompts, 20, "off", prefix="o"))]
    binary = eng.generate(greedy_requests(prompts, 20, "binary", prefix="b"))
    assert [r.token_ids for r in binary] == off
    assert sum(r.via_sd.draft_tokens for r in binary) > 0
    assert seen and set(seen) == {3 * eng.model.cfg.hidden_size}  # two taps and the final-norm state
    assert head.taps == (0, 2)
    three = eng.generate(greedy_requests(prompts, 20, "three_tier", prefix="t"))
    assert all(len(r.token_ids) == 20 for r in three)
    assert any(starts)  # some full passes started from the slim prefix and took its taps
    assert_pool_full(eng)


def test_train_head_with_taps_on_tiny_model(tiny_model_dir, tmp_path):
    """`--taps` records the tapped layers with the answers, trains a head that reads them, and
    grows a head without them (`--init`); the engine serves the result."""
    from server.engine.drafters.train_head import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "category": "t", "prompt": f"say {w}"}) + "\n"
                               for i, w in enumerate(["a", "bb", "ccc", "dddd", "e", "ff"])))
    common = ["--model", str(tiny_model_dir), "--prompts", str(prompts), "--max-tokens", "12", "--sampled", "1",
              "--vocab", "64", "--ffn", "32", "--heads", "4", "--window", "8", "--epochs", "1", "--batch-size", "4",
              "--heldout", "0.34"]
    plain = tmp_path / "plain.head"
    assert main(common + ["--data", str(tmp_path / "plain.pt"), "--out", str(plain)]) == 0
    tapped = tmp_path / "tapped.head"
    assert main(common + ["--data", str(tmp_path / "taps.pt"), "--taps", "1,2", "--out", str(tapped)]) == 0
    data = torch.load(tmp_path / "taps.pt")
    H = json.loads((tiny_model_dir / "config.json").read_text())["hidden_size"]
    assert data["key"]["taps"] == [1, 2] and {a["hidden"].shape[-1] for a in data["seqs"]} == {3 * H}
    rec = json.loads(Path(str(tapped) + ".json").read_text())
    assert rec["head"]["taps"] == [1, 2] and 0.0 <= rec["heldout"]["top1"] <= 1.0
    head, _ = DraftHead.load(Path(str(tapped) + ".safetensors"))
    assert head.taps == (1, 2)

    grown = tmp_path / "grown.head"
    assert main(common + ["--data", str(tmp_path / "taps.pt"), "--taps", "1,2", "--init",
                          str(plain) + ".safetensors", "--out", str(grown)]) == 0
    g, _ = DraftHead.load(Path(str(grown) + ".safetensors"))
    p, _ = DraftHead.load(Path(str(plain) + ".safetensors"))
    assert g.taps == (1, 2) and torch.equal(g.reduced_ids, p.reduced_ids)
    with pytest.raises(SystemExit, match="--taps 1,2"):  # a tapped head continues only on tapped features
        main(common + ["--data", str(tmp_path / "plain.pt"), "--init", str(grown) + ".safetensors",
                       "--out", str(tmp_path / "x.head")])
    eng = make_engine(tiny_model_dir, spec={"drafter": "head", "head_path": str(grown) + ".safetensors"})
    out = eng.generate(greedy_requests([[5, 6, 7, 8]], 12, "binary"))
    ref = eng.generate(greedy_requests([[5, 6, 7, 8]], 12, "off", prefix="o"))
    assert out[0].token_ids == ref[0].token_ids
    assert_pool_full(eng)
