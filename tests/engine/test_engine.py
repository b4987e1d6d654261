"""The embedded engine on a tiny random Llama: exactness, batching, preemption, sampling."""

from __future__ import annotations

import math
import random

import pytest
import torch

from server.engine.api import GenerationRequest, RequestRejected
from server.engine.config import SamplingParams, SpecParams
from tests.engine.helpers import assert_pool_full, generate_checked, greedy_requests, hf_greedy, make_engine

PROMPTS = [[random.Random(i).randrange(256) for _ in range(5 + 7 * i)] for i in range(8)]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return hf_greedy(tiny_model_dir, PROMPTS, 24)


def run(engine, reqs):
    return [r.token_ids for r in generate_checked(engine, reqs)]


def test_greedy_equals_transformers_alone_and_batched(tiny_model_dir, reference):
    eng = make_engine(tiny_model_dir, spec={"mode": "off"})
    alone = [run(eng, greedy_requests([p], 24, ignore_eos=True, prefix=f"a{i}"))[0] for i, p in enumerate(PROMPTS)]
    assert alone == reference
    batched = run(eng, greedy_requests(PROMPTS, 24, ignore_eos=True))
    assert batched == reference


def test_chunked_prefill_and_preemption_keep_output_exact(tiny_model_dir, reference):
    # 12 usable blocks of 4 slots: eight sequences of up to 78 tokens cannot all fit
    eng = make_engine(tiny_model_dir, spec={"mode": "off"}, block_size=4, num_blocks=24, prefill_chunk=8,
                      max_num_batched_tokens=32)
    out = run(eng, greedy_requests(PROMPTS, 24, ignore_eos=True))
    assert out == reference
    assert eng.stats().preemptions > 0


def test_abort_returns_every_block(tiny_model_dir):
    eng = make_engine(tiny_model_dir, spec={"mode": "three_tier"})
    for r in greedy_requests(PROMPTS[:4], 50, ignore_eos=True):
        eng.add_request(r)
    for _ in range(3):
        eng.step()
    assert eng.cache.pool.num_free < eng.cache.pool.num_usable
    outs = [eng.abort(f"r{i}") for i in range(4)]
    assert all(o.finished and o.finish_reason == "abort" for o in outs)
    assert_pool_full(eng)
    assert eng.abort("r0") is None  # aborting twice is harmless


def test_max_tokens_eos_and_stop_strings(tiny_model_dir):
    eng = make_engine(tiny_model_dir, spec={"mode": "off"})
    (r,) = eng.generate(greedy_requests([PROMPTS[0]], 7, ignore_eos=True))
    assert len(r.token_ids) == 7 and r.finish_reason == "length"
    text = eng.tokenizer.decode(r.token_ids)
    # a stop string taken from the middle of the greedy text cuts the text right before it
    stop = text[3:5]
    (s,) = eng.generate(greedy_requests([PROMPTS[0]], 7, ignore_eos=True, stop=(stop,), prefix="s"))
    assert s.finish_reason == "stop" and s.text == text[: text.find(stop)]
    # a stop token id ends generation and is the last token
    (t,) = eng.generate(greedy_requests([PROMPTS[0]], 7, ignore_eos=True, stop_token_ids=(r.token_ids[2],), prefix="t"))
    assert t.finish_reason == "stop" and t.token_ids == r.token_ids[: r.token_ids.index(r.token_ids[2]) + 1]
    assert_pool_full(eng)


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_model_dir):
    eng = make_engine(tiny_model_dir, spec={"mode": "off"})

    def req(rid, seed):
        return GenerationRequest(rid, tuple(PROMPTS[1]), SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9,
                                                                          top_k=50, seed=seed, ignore_eos=True))

    (a,) = eng.generate([req("a", 7)])
    b = eng.generate([req("x", 1), req("b", 7), req("y", 2)])[1]
    assert a.token_ids == b.token_ids
    (c,) = eng.generate([req("c", 8)])
    assert c.token_ids != a.token_ids
    assert_pool_full(eng)


def test_logprobs_match_the_model(tiny_model_dir):
    eng = make_engine(tiny_model_dir, spec={"mode": "off"})
    (r,) = eng.generate(greedy_requests([PROMPTS[2]], 4, ignore_eos=True, logprobs=3))
    assert len(r.logprobs) == 4
    for lp in r.logprobs:
        assert lp.top[0][0] == lp.token_id  # greedy: the chosen token is the most likely
        assert abs(lp.top[0][1] - lp.logprob) < 1e-5 and len(lp.top) == 3 and lp.logprob <= 0


@pytest.mark.parametrize("mode", ["binary", "three_tier"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_speculating_with_penalties_gives_what_plain_decoding_with_them_gives(tiny_model_dir, mode, temperature):
    """Verification applies the penalties at each draft position with the counts the drafts
    before it make: the tokens equal `off`'s, greedy and seeded, while drafts are verified (every
    draft: on the random model the adaptive length would verify few of the sampled ones)."""
    eng = make_engine(tiny_model_dir, spec={"mode": mode, "adaptive_draft": False})

    def reqs(m):
        return [GenerationRequest(f"{m}{i}", tuple(p), SamplingParams(
            max_tokens=40, temperature=temperature, seed=i, ignore_eos=True, presence_penalty=0.2,
            frequency_penalty=0.3 * (i % 3), logit_bias=((65, 1.5),) if i % 2 else (),
            repetition_penalty=1.3 if i % 2 == 0 else 1.0, min_p=0.05 * (i % 3)), SpecParams(mode=m))
            for i, p in enumerate(PROMPTS)]

    off = generate_checked(eng, reqs("off"))
    spec = generate_checked(eng, reqs(mode))
    assert [r.token_ids for r in spec] == [r.token_ids for r in off]
    assert sum(r.via_sd.draft_tokens for r in spec) > 0
    if temperature == 0.0:  # (sampled from the random model, drafts are refused: the rows still decide)
        assert sum(r.via_sd.accepted for r in spec) > 0


@pytest.mark.parametrize("bad,param", [
    (dict(prompt=()), "prompt"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(max_tokens=600), "max_tokens"),
    (dict(prompt=(999999,)), "prompt"),
])
def test_bad_requests_are_rejected_without_state(tiny_model_dir, bad, param):
    eng = make_engine(tiny_model_dir, spec={"mode": "off"})
    prompt = bad.pop("prompt", (1, 2, 3))
    sp = SamplingParams(**{"max_tokens": 4, **bad})
    with pytest.raises(RequestRejected) as e:
        eng.add_request(GenerationRequest("bad", prompt, sp))
    assert e.value.param == param
    assert_pool_full(eng)
    assert eng.seqs == {}


def test_spec_usage_to_dict_is_every_field_in_order_and_a_copy():
    import dataclasses

    from server.engine.api import SpecUsage

    u = SpecUsage(**{f.name: i + 1 for i, f in enumerate(dataclasses.fields(SpecUsage))})
    d = u.to_dict()
    assert d == dataclasses.asdict(u) and list(d) == [f.name for f in dataclasses.fields(SpecUsage)]
    copy = SpecUsage(**d)
    u.add(u)
    assert copy != u and copy.to_dict() == d  # an output's counts do not move with the request's


@pytest.fixture(scope="module")
def hf_prompt_logprobs(tiny_model_dir):
    """Each PROMPTS prompt's token logprobs (positions 1..) and top-3, from transformers' forward."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    out = []
    for p in PROMPTS:
        with torch.inference_mode():
            lsm = torch.log_softmax(m(torch.tensor([p])).logits[0].float(), -1)
        out.append((lsm[:-1].gather(-1, torch.tensor(p[1:]).view(-1, 1)).squeeze(-1), lsm[:-1].topk(3, -1)))
    return out


def _check_prompt_logprobs(result, prompt, ref):
    chosen, (top_v, top_i) = ref
    lps = result.prompt_logprobs
    assert lps is not None and len(lps) == len(prompt) and lps[0] is None
    assert [lp.token_id for lp in lps[1:]] == list(prompt[1:])
    got = torch.tensor([lp.logprob for lp in lps[1:]])
    assert torch.allclose(got, chosen, atol=1e-4), (got - chosen).abs().max()
    for j, lp in enumerate(lps[1:]):
        assert [t for t, _ in lp.top] == top_i[j].tolist()
        assert torch.allclose(torch.tensor([v for _, v in lp.top]), top_v[j], atol=1e-4)


@pytest.mark.parametrize("mode", ["off", "three_tier"])
def test_prompt_logprobs_match_the_model_and_leave_the_output_alone(tiny_model_dir, reference, hf_prompt_logprobs, mode):
    # chunked prefill (8 tokens), a small pool that preempts, a prefix cache holding the prompts
    # already, speculating neighbours: each prompt's logprobs are the model's, every output the greedy one
    eng = make_engine(tiny_model_dir, spec={"mode": mode}, block_size=4, num_blocks=24 if mode == "off" else 30,
                      prefill_chunk=8, max_num_batched_tokens=32, enable_prefix_caching=True)
    run(eng, greedy_requests(PROMPTS, 4, ignore_eos=True, prefix="warm"))
    asks = [i % 2 == 0 for i in range(len(PROMPTS))]
    reqs = [GenerationRequest(f"r{i}", tuple(p), SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                              prompt_logprobs=3 if a else None))
            for i, (p, a) in enumerate(zip(PROMPTS, asks))]
    res = generate_checked(eng, reqs)
    assert [r.token_ids for r in res] == reference
    assert eng.stats().preemptions > 0
    for r, p, a, ref in zip(res, PROMPTS, asks, hf_prompt_logprobs):
        if a:
            _check_prompt_logprobs(r, p, ref)
            assert r.cached_tokens == 0  # read, not found in the cache
        else:
            assert r.prompt_logprobs is None


def test_prompt_logprobs_come_once_with_the_first_delta(tiny_model_dir, hf_prompt_logprobs):
    eng = make_engine(tiny_model_dir, spec={"mode": "off"}, prefill_chunk=8)
    p = PROMPTS[3]
    eng.add_request(GenerationRequest("a", tuple(p), SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True,
                                                                    prompt_logprobs=0)))
    deltas = []
    while eng.has_unfinished():
        deltas += eng.step()
    assert deltas[0].prompt_logprobs is not None and all(d.prompt_logprobs is None for d in deltas[1:])
    assert all(lp.top == () for lp in deltas[0].prompt_logprobs[1:])
    chosen = torch.tensor([lp.logprob for lp in deltas[0].prompt_logprobs[1:]])
    assert torch.allclose(chosen, hf_prompt_logprobs[3][0], atol=1e-4)
    assert_pool_full(eng)
    with pytest.raises(RequestRejected):
        eng.add_request(GenerationRequest("b", (1, 2), SamplingParams(max_tokens=1, prompt_logprobs=21)))


def _hf_penalized_greedy(model_dir, prompt, n, presence, frequency, bias=()):
    """Greedy decoding with OpenAI's penalties and a logit bias, one full forward per token."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    toks, out = list(prompt), []
    for _ in range(n):
        with torch.inference_mode():
            logits = m(torch.tensor([toks])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel())[: logits.numel()]
        logits = logits - frequency * counts - presence * (counts > 0)
        for t, b in bias:
            logits[t] += b
        t = int(logits.argmax())
        toks.append(t)
        out.append(t)
    return out


@pytest.mark.parametrize("mode", ["off", "binary", "three_tier"])
def test_penalties_and_logit_bias_follow_openais_rule_with_or_without_speculation(tiny_model_dir, reference, mode):
    eng = make_engine(tiny_model_dir, spec={"mode": mode})
    p = PROMPTS[1]
    bias = ((reference[1][0], -5.0), (65, 2.0))
    want = _hf_penalized_greedy(tiny_model_dir, p, 20, 0.5, 1.5, bias)
    assert want != reference[1][:20]  # the penalties change this greedy text
    (r,) = generate_checked(eng, [GenerationRequest("p", tuple(p), SamplingParams(
        max_tokens=20, temperature=0.0, ignore_eos=True, presence_penalty=0.5, frequency_penalty=1.5,
        logit_bias=bias, logprobs=0), SpecParams(mode=mode))])
    assert r.token_ids == want
    assert r.via_sd.slim_passes == 0  # adjusted logits come from the full model's rows
    # logprobs stay the model's: the chosen token's raw logprob, which the bias does not move
    (plain,) = generate_checked(eng, greedy_requests([p], 1, ignore_eos=True, logprobs=0, prefix="q"))
    (biased,) = generate_checked(eng, [GenerationRequest("b", tuple(p), SamplingParams(
        max_tokens=1, temperature=0.0, logprobs=0, logit_bias=((plain.token_ids[0], 50.0),)))])
    assert biased.logprobs[0].logprob == pytest.approx(plain.logprobs[0].logprob, abs=1e-5)
    # a large bias decides every token, greedy or sampled
    for temperature in (0.0, 1.0):
        (forced,) = generate_checked(eng, [GenerationRequest(f"f{temperature}", tuple(p), SamplingParams(
            max_tokens=8, temperature=temperature, ignore_eos=True, logit_bias=((65, 100.0),)))])
        assert forced.token_ids == [65] * 8


@pytest.mark.parametrize("bad,param", [
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(logit_bias=((1, 101.0),)), "logit_bias"),
    (dict(logit_bias=((999999, 1.0),)), "logit_bias"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(min_p=1.5), "min_p"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=5), "min_tokens"),  # more than max_tokens
])
def test_bad_penalties_are_rejected(tiny_model_dir, bad, param):
    eng = make_engine(tiny_model_dir, spec={"mode": "off"})
    with pytest.raises(RequestRejected) as e:
        eng.add_request(GenerationRequest("bad", (1, 2, 3), SamplingParams(max_tokens=4, **bad)))
    assert e.value.param == param
    assert_pool_full(eng)


def _hf_generate(model_dir, prompt, n, **kw):
    """transformers' own greedy `generate` with its logits processors (`repetition_penalty`)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.inference_mode():
        o = m.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None, **kw)
    return o[0, len(prompt):].tolist()


@pytest.mark.parametrize("mode", ["off", "binary", "three_tier"])
def test_repetition_penalty_follows_transformers_with_or_without_speculation(tiny_model_dir, reference, mode):
    """vLLM's and transformers' rule: every token of the prompt and the output has its positive
    logit divided by the penalty and its negative one multiplied; verification applies it per
    draft position with the drafts before it counted."""
    p = PROMPTS[1]
    want = _hf_generate(tiny_model_dir, p, 24, repetition_penalty=1.8)
    assert want != reference[1]  # the penalty changes this greedy text
    eng = make_engine(tiny_model_dir, spec={"mode": mode, "adaptive_draft": False})
    (r,) = generate_checked(eng, [GenerationRequest("r", tuple(p), SamplingParams(
        max_tokens=24, temperature=0.0, ignore_eos=True, repetition_penalty=1.8), SpecParams(mode=mode))])
    assert r.token_ids == want
    assert r.via_sd.slim_passes == 0


@pytest.mark.parametrize("mode", ["off", "binary"])
def test_min_tokens_holds_back_eos_stop_token_ids_and_stop_strings(tiny_model_dir, mode):
    eng = make_engine(tiny_model_dir, spec={"mode": mode, "adaptive_draft": False})
    eos = min(eng.eos_ids)
    (x,) = eng.tokenizer.encode("x")
    n = iter(range(100))

    def gen(**kw):
        kw = {"max_tokens": 12, "temperature": 0.0, **kw}
        (r,) = generate_checked(eng, [GenerationRequest(f"m{next(n)}", tuple(PROMPTS[2]), SamplingParams(**kw),
                                                        SpecParams(mode=mode))])
        return r

    # EOS forced by a bias ends the output at once; min_tokens keeps it out of the first 5 tokens
    r = gen(logit_bias=((eos, 100.0),))
    assert (r.token_ids, r.finish_reason) == ([eos], "stop")
    r = gen(logit_bias=((eos, 100.0),), min_tokens=5)
    assert len(r.token_ids) == 6 and eos not in r.token_ids[:5] and r.token_ids[5] == eos and r.finish_reason == "stop"
    # a stop token id, likewise (ignore_eos does not lift it)
    r = gen(logit_bias=((65, 100.0),), stop_token_ids=(65,), ignore_eos=True, min_tokens=3)
    assert len(r.token_ids) == 4 and 65 not in r.token_ids[:3] and r.token_ids[3] == 65
    # a stop string counts only where it ends after the first min_tokens tokens' text
    r = gen(logit_bias=((x, 100.0),), stop=("x",), ignore_eos=True)
    assert (r.text, r.finish_reason) == ("", "stop")
    r = gen(logit_bias=((x, 100.0),), stop=("x",), ignore_eos=True, min_tokens=3)
    assert (r.text, r.finish_reason) == ("xxx", "stop")
    r = gen(logit_bias=((x, 100.0),), stop=("xxxx",), ignore_eos=True, min_tokens=2)
    assert (r.text, r.finish_reason) == ("", "stop")  # "xxxx" ends at the 4th token, after the 2nd
    assert gen(max_tokens=4, min_tokens=4, ignore_eos=True).finish_reason == "length"


def test_min_tokens_adjusts_only_until_it_is_reached(tiny_model_dir):
    sp = SamplingParams(max_tokens=20, temperature=0.0, min_tokens=6)
    assert [sp.adjusts_logits(n) for n in (0, 5, 6, 7)] == [True, True, False, False]
    assert [sp.argmax_only(n) for n in (5, 6)] == [False, True]
    assert SamplingParams(max_tokens=20, temperature=0.0, min_tokens=6, logit_bias=((3, 1.0),)).adjusts_logits(9)
    # past min_tokens, a three_tier request takes the slim tier again (it sits out while rows are masked)
    forced = {"mode": "three_tier", "accept_threshold": 0.3, "escalate_threshold": 0.1, "bonus_confidence": 0.0,
              "controller": False, "slim_confidence": 0.0, "adaptive_draft": False}
    eng = make_engine(tiny_model_dir, spec=forced)

    def slim_passes(min_tokens):
        (r,) = generate_checked(eng, [GenerationRequest(f"m{min_tokens}", tuple(PROMPTS[0]), SamplingParams(
            max_tokens=40, temperature=0.0, ignore_eos=True, min_tokens=min_tokens), SpecParams(mode="three_tier"))])
        assert len(r.token_ids) == 40
        return r.via_sd.slim_passes

    assert slim_passes(40) == 0 and slim_passes(10) > 0


def test_min_p_keeps_only_tokens_near_the_top(tiny_model_dir, reference):
    eng = make_engine(tiny_model_dir, spec={"mode": "off"})
    p = PROMPTS[1]

    def sample(rid, **kw):
        (r,) = generate_checked(eng, [GenerationRequest(rid, tuple(p), SamplingParams(
            max_tokens=24, temperature=1.0, seed=3, ignore_eos=True, logprobs=1, **kw))])
        return r

    # min_p 1 keeps the top token alone: sampling becomes greedy
    assert sample("top", min_p=1.0).token_ids == reference[1]
    # at temperature 1 every sampled token is at least min_p x the top token's probability (the
    # logprobs are the model's), and without min_p the same seed samples tokens below that
    bound = math.log(0.6)
    kept = sample("min", min_p=0.6).logprobs
    assert all(lp.logprob >= lp.top[0][1] + bound - 1e-5 for lp in kept)
    assert any(lp.logprob < lp.top[0][1] + bound for lp in sample("all").logprobs)
    # greedy requests are not affected
    (g,) = generate_checked(eng, [GenerationRequest("g", tuple(p), SamplingParams(
        max_tokens=24, temperature=0.0, ignore_eos=True, min_p=0.5))])
    assert g.token_ids == reference[1]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_allowed_token_ids_bound_every_token_with_or_without_speculation(tiny_model_dir, temperature):
    allowed = tuple(range(97, 123))  # the letters a-z
    outs = {}
    for mode in ("off", "binary"):
        eng = make_engine(tiny_model_dir, spec={"mode": mode, "adaptive_draft": False})
        (r,) = generate_checked(eng, [GenerationRequest(f"a{mode}", tuple(PROMPTS[3]), SamplingParams(
            max_tokens=30, temperature=temperature, seed=5, ignore_eos=True, allowed_token_ids=allowed),
            SpecParams(mode=mode))])
        assert set(r.token_ids) <= set(allowed) and r.via_sd.slim_passes == 0
        outs[mode] = r.token_ids
    assert outs["binary"] == outs["off"]
    eng = make_engine(tiny_model_dir, spec={"mode": "off"})
    for bad in ((), (eng.model.cfg.vocab_size,)):
        with pytest.raises(RequestRejected) as e:
            eng.add_request(GenerationRequest("bad", (1, 2, 3), SamplingParams(max_tokens=4, allowed_token_ids=bad)))
        assert e.value.param == "allowed_token_ids"
    assert_pool_full(eng)


def test_the_stop_string_or_token_in_the_text_only_when_asked(tiny_model_dir):
    eng = make_engine(tiny_model_dir, spec={"mode": "off"})
    eos = min(eng.eos_ids)
    (x,) = eng.tokenizer.encode("x")
    (y,) = eng.tokenizer.encode("y")
    n = iter(range(100))

    def text(**kw):
        (r,) = generate_checked(eng, [GenerationRequest(f"s{next(n)}", tuple(PROMPTS[2]), SamplingParams(
            **{"max_tokens": 6, "temperature": 0.0, **kw}))])
        return r.text, r.finish_reason, r.token_ids

    # a stop string: left out, or kept with include_stop_str_in_output
    assert text(logit_bias=((x, 100.0),), stop=("xx",))[:2] == ("", "stop")
    assert text(logit_bias=((x, 100.0),), stop=("xx",), include_stop_str_in_output=True)[:2] == ("xx", "stop")
    # a stop token id: in the token ids either way, in the text only when asked (as vLLM)
    t, reason, ids = text(logit_bias=((y, 100.0),), stop_token_ids=(y,))
    assert (t, reason, ids) == ("", "stop", [y])
    assert text(logit_bias=((y, 100.0),), stop_token_ids=(y,), include_stop_str_in_output=True)[0] == "y"
    # EOS kept by ignore_eos shows only without skip_special_tokens
    special = eng.tokenizer.decode([eos], skip_special_tokens=False)
    assert text(logit_bias=((eos, 100.0),), ignore_eos=True, max_tokens=3)[0] == ""
    assert text(logit_bias=((eos, 100.0),), ignore_eos=True, max_tokens=3, skip_special_tokens=False)[0] == special * 3


@pytest.mark.parametrize("mode", ["off", "binary"])
def test_bad_words_are_never_written(tiny_model_dir, reference, mode):
    """vLLM's rule: a bad word's last token is masked wherever the output ends with the tokens
    before it (a one-token word everywhere); the tiny model's tokens are bytes."""
    from server.engine.engine import bad_words_token_ids

    eng = make_engine(tiny_model_dir, spec={"mode": mode, "adaptive_draft": False})
    tok = eng.tokenizer
    plain = tok.decode(reference[1])
    word = next(plain[i:i + 3] for i in range(len(plain) - 3) if plain[i:i + 3].strip() == plain[i:i + 3]
                and len(tok.encode(plain[i:i + 3])) == 3)
    assert bad_words_token_ids(tok, (word,))[0] == tuple(tok.encode(word))
    (r,) = generate_checked(eng, [GenerationRequest("w", tuple(PROMPTS[1]), SamplingParams(
        max_tokens=24, temperature=0.0, ignore_eos=True, bad_words=(word,)), SpecParams(mode=mode))])
    assert word not in r.text and r.token_ids != reference[1]
    # the output up to where the word would have been written is the plain one
    cut = plain.index(word) + 2
    assert r.text[:cut] == plain[:cut]
    # a one-token word is out everywhere
    (one,) = generate_checked(eng, [GenerationRequest("o", tuple(PROMPTS[1]), SamplingParams(
        max_tokens=24, temperature=0.0, ignore_eos=True, bad_words=(plain[0],)), SpecParams(mode=mode))])
    assert reference[1][0] not in one.token_ids
