"""The gateway's HTTP contract on the vLLM backend: `create_app` over `VLLMAsyncEngine` (vLLM's
AsyncLLM with the plugin worker, schedule `skip`), served by uvicorn on a loopback port in a
thread, driven with the openai SDK and httpx. One engine for the whole module (a start is ~30 s on
2 idle cores), small max_tokens, 1 GiB of KV cache.

What the backend does differently from the embedded engine, and what is checked for it:
- `usage.via_sd` is read from the worker when the request finishes and arrives with the final
  delta; intermediate deltas carry the latest snapshot the backend has (refreshed about once a
  second, possibly still zeros). The gateway only reports usage from the final delta: the JSON
  response's `usage` and the streamed usage chunk (`stream_options.include_usage`).
- logprobs are vLLM's own (the full model's); a batch with a logprobs request never skips the full
  forward (runner.py), so they are exact.

Skipped, with the reason, where vllm is not importable (the main venv).
"""

from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("vllm", reason="needs the vLLM environment (.venv-vllm, `make vllm-env`)")

import httpx  # noqa: E402
import openai  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tests.gateway.conftest import running_server  # noqa: E402
from tests.gateway.test_openai_sdk import check_chat_and_completions  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.real_model]

MODEL = "smollm2"
MAX_MODEL_LEN = 512
VIA_SD_FIELDS = {"draft_tokens", "accepted", "slim_regenerated", "full_verified", "slim_passes", "full_passes", "steps",
                 "lenient_accepted"}


@pytest.fixture(scope="module")
def server():
    from server.engine.config import EngineConfig, SpecConfig
    from server.engine.model_files import prepare_model
    from server.gateway.app import create_app
    from server.vllm_plugin.backend import VLLMAsyncEngine

    folder = os.environ.get("VIA_SD_TEST_MODEL") or str(prepare_model(progress=False))
    config = EngineConfig(model=folder, max_model_len=MAX_MODEL_LEN, max_num_seqs=4, kv_cache_memory_gb=1.0,
                          spec=SpecConfig(mode="three_tier"))
    engine = VLLMAsyncEngine(config)
    engine.tokenizer.apply_chat_template([{"role": "user", "content": "warm up"}])  # compile in this thread
    app = create_app(engine, api_key=None, served_model_names=[MODEL], lifespan_start=True, shutdown_grace_s=5)
    with running_server(app, start_timeout_s=420) as url:
        yield url, engine


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0)


def scrape(url: str) -> dict:
    text = httpx.get(url + "/metrics", timeout=20).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def wait_idle(url: str, engine, timeout_s: float = 30.0) -> dict:
    """Until nothing is in flight and /metrics shows no running or waiting request."""
    deadline = time.monotonic() + timeout_s
    m = {}
    while time.monotonic() < deadline:
        m = scrape(url)
        if (not engine._inflight and m[("via_sd_requests_running", ())] == 0
                and m[("via_sd_requests_waiting", ())] == 0):
            return m
        time.sleep(0.1)
    raise AssertionError(f"not idle: inflight={engine._inflight} running={m.get(('via_sd_requests_running', ()))}")


def check_via_sd(usage: dict, finish_reason: str) -> None:
    u = usage["via_sd"]
    assert set(u) == VIA_SD_FIELDS, u
    assert u["lenient_accepted"] == 0  # the plugin verifies exactly
    n = usage["completion_tokens"]
    assert 0 < u["steps"] and u["full_passes"] <= u["steps"] and u["slim_passes"] <= u["steps"]
    assert u["accepted"] <= u["draft_tokens"]
    assert u["full_verified"] <= u["draft_tokens"]
    # a step emits its accepted drafts plus one token; the last step may be cut at max_tokens/stop
    assert u["steps"] <= n + 1 and n <= u["accepted"] + u["steps"], (u, n)
    if finish_reason == "length":
        assert u["steps"] <= n


def test_health_models_and_sdk_contract(server):
    url, engine = server
    assert httpx.get(url + "/health").status_code == 200
    c = client(url)
    assert [m.id for m in c.models.list()] == [MODEL]
    check_chat_and_completions(c, MODEL, max_tokens=16, logprobs=True)
    wait_idle(url, engine)


@pytest.mark.parametrize("mode", ["off", "binary", "three_tier"])
def test_streams_join_and_final_usage(server, mode):
    url, engine = server
    c = client(url)
    extra = {"via_sd": {"mode": mode}}
    prompt = "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox"
    full = c.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, extra_body=extra)
    pieces = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body=extra))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == full.choices[0].text
    assert [p.choices[0].finish_reason for p in pieces if p.choices and p.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]
    # usage only on the last chunk, and it is the request's final count (not the zeros of a delta)
    assert all(p.usage is None for p in pieces[:-1])
    last = pieces[-1].usage.model_dump()
    want = full.usage.model_dump()
    assert last["completion_tokens"] == want["completion_tokens"] and last["prompt_tokens"] == want["prompt_tokens"]
    for u, fr in ((want, full.choices[0].finish_reason), (last, full.choices[0].finish_reason)):
        check_via_sd(u, fr)
        if mode == "off":
            assert u["via_sd"]["draft_tokens"] == 0 and u["via_sd"]["slim_passes"] == 0
        else:
            assert u["via_sd"]["draft_tokens"] > 0  # the repeated phrase gives n-gram drafts
        if mode == "binary":
            assert u["via_sd"]["slim_passes"] == 0
    if mode != "off":  # greedy on one sequence: the same steps, the same counts
        assert last["via_sd"] == want["via_sd"]
    wait_idle(url, engine)


def test_stop_strings_and_finish_reason(server):
    url, engine = server
    body = {"model": MODEL, "prompt": "List the days of the week: Monday, Tuesday,", "max_tokens": 24,
            "temperature": 0, "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert r.json()["choices"][0]["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 24
    words = [w for w in text.split() if len(w) >= 3]
    assert len(words) >= 2, text
    stop = words[1]
    r2 = httpx.post(url + "/v1/completions", json={**body, "stop": [stop]}, timeout=120)
    assert r2.status_code == 200, r2.text
    ch = r2.json()["choices"][0]
    assert ch["finish_reason"] == "stop"
    assert ch["text"] == text[: text.index(stop)]
    check_via_sd(r2.json()["usage"], "stop")
    wait_idle(url, engine)


def test_a_batch_scored_with_echo_reads_vllms_prompt_logprobs(server):
    # lm-eval-harness's loglikelihood request: token-id prompts in a batch, echo, logprobs, max_tokens 0
    url, engine = server
    tok = engine.tokenizer
    prompts = [tok.encode("The capital of France is Paris"), tok.encode("One, two, three, four")]
    body = {"model": MODEL, "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [ch["index"] for ch in out["choices"]] == [0, 1]
    assert out["usage"]["prompt_tokens"] == sum(map(len, prompts)) and out["usage"]["completion_tokens"] == 0
    for p, ch in zip(prompts, out["choices"]):
        lp = ch["logprobs"]
        assert ch["text"] == tok.decode(p, skip_special_tokens=False) and ch["finish_reason"] == "length"
        assert len(lp["tokens"]) == len(p) and lp["token_logprobs"][0] is None
        assert all(v is not None and v <= 0 for v in lp["token_logprobs"][1:])
        # each top entry is at least as likely as the prompt's own token there
        assert all(max(top.values()) >= v - 1e-4 for top, v in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]))
    # the counting sequence's last tokens are easy: "four" after "One, two, three," is likely
    assert out["choices"][1]["logprobs"]["token_logprobs"][-1] > -3
    wait_idle(url, engine)


def test_penalties_reach_vllm_and_logit_bias_is_a_400_there(server):
    url, engine = server
    body = {"model": MODEL, "prompt": "Say yes, yes, yes, yes, yes, yes:", "max_tokens": 16, "temperature": 0,
            "ignore_eos": True}
    plain = httpx.post(url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    for penalty in ({"frequency_penalty": 2.0}, {"repetition_penalty": 1.8}):
        r = httpx.post(url + "/v1/completions", json={**body, **penalty}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] != plain, penalty  # the penalty moved the greedy text
    # vLLM's speculative decoding does not take logit_bias: its own words, as a 400, nothing left running
    r = httpx.post(url + "/v1/completions", json={**body, "logit_bias": {"28": 5}}, timeout=120)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "logit_bias" and "speculative" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={**body, "temperature": 1.0, "min_p": 0.1}, timeout=120)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "min_p" and "speculative" in r.json()["error"]["message"]
    wait_idle(url, engine)


def test_min_tokens_reaches_vllm(server):
    url, engine = server
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Answer with one word: is water wet?"}],
            "max_tokens": 40, "temperature": 0, "via_sd": {"mode": "three_tier"}}
    short = httpx.post(url + "/v1/chat/completions", json=chat, timeout=120).json()
    assert short["choices"][0]["finish_reason"] == "stop" and short["usage"]["completion_tokens"] < 20, short
    r = httpx.post(url + "/v1/chat/completions", json={**chat, "min_tokens": 20}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 20, r.json()
    wait_idle(url, engine)


def test_the_slim_tier_resumes_once_min_tokens_is_reached(server):
    """A `min_tokens` request keeps its batch off the slim tier only while it is short of the
    minimum (vLLM masks its stop tokens until then); afterwards the slim pass runs again."""
    url, engine = server
    body = {"model": MODEL, "prompt": "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox",
            "max_tokens": 24, "temperature": 0, "via_sd": {"mode": "three_tier"}}
    r = httpx.post(url + "/v1/completions", json={**body, "min_tokens": 2}, timeout=120)
    assert r.status_code == 200, r.text
    u = r.json()["usage"]
    assert u["completion_tokens"] >= 2 and u["via_sd"]["slim_passes"] > 0, u
    wait_idle(url, engine)


def test_prompt_logprobs_with_ranks_on_vllm(server):
    url, engine = server
    ids = httpx.post(url + "/tokenize", json={"prompt": "The capital of France is"}, timeout=30).json()["tokens"]
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 1, "temperature": 0,
                                                  "prompt_logprobs": 2}, timeout=120)
    assert r.status_code == 200, r.text
    plp = r.json()["choices"][0]["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for tid, entry in zip(ids[1:], plp[1:]):
        assert entry[str(tid)]["rank"] >= 1 and entry[str(tid)]["logprob"] <= 0
        assert sorted(e["rank"] for t, e in entry.items() if t != str(tid))[:1] in ([1], [2])
    wait_idle(url, engine)


def test_allowed_token_ids_and_stop_strings_in_the_text_on_vllm(server):
    """vLLM's own extensions pass through: every token from `allowed_token_ids` (the plugin runs no
    slim pass for such a batch), and `include_stop_str_in_output` keeps the stop string."""
    url, engine = server
    prompt = "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox"
    allowed = httpx.post(url + "/tokenize", json={"prompt": prompt}, timeout=30).json()["tokens"]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0, "via_sd": {"mode": "three_tier"}}
    r = httpx.post(url + "/v1/completions", json={**body, "allowed_token_ids": allowed, "logprobs": 0}, timeout=120)
    assert r.status_code == 200, r.text
    toks = r.json()["choices"][0]["logprobs"]["tokens"]
    ids = httpx.post(url + "/tokenize", json={"prompt": "".join(toks), "add_special_tokens": False}, timeout=30).json()
    assert set(ids["tokens"]) <= set(allowed)
    plain = httpx.post(url + "/v1/completions", json={**body, "stop": [" dog"]}, timeout=120).json()
    kept = httpx.post(url + "/v1/completions", json={**body, "stop": [" dog"], "include_stop_str_in_output": True},
                      timeout=120).json()
    assert kept["choices"][0]["text"] == plain["choices"][0]["text"] + " dog"
    wait_idle(url, engine)


@pytest.mark.parametrize("extra", [{"temperature": 0.8, "seed": 7}, {"logprobs": 2}, {"presence_penalty": 0.5},
                                   {"repetition_penalty": 0.9}, {"min_tokens": 24},
                                   {"allowed_token_ids": list(range(49152))}, {"bad_words": ["zebra"]}],
                         ids=["sampled", "logprobs", "penalty", "repetition_penalty", "min_tokens", "allowed_token_ids",
                              "bad_words"])
def test_batches_the_slim_tier_cannot_decide_run_no_slim_pass(server, extra):
    """Such a request speculates (vLLM verifies its drafts) but the plugin spends no slim pass
    on it: no row of its batch may take the gate's tokens, so the slim pass would decide nothing."""
    url, engine = server
    body = {"model": MODEL, "prompt": "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox",
            "max_tokens": 24, "temperature": 0, "via_sd": {"mode": "three_tier"}}
    r = httpx.post(url + "/v1/completions", json={**body, **extra}, timeout=120)
    assert r.status_code == 200, r.text
    u = r.json()["usage"]["via_sd"]
    assert u["draft_tokens"] > 0 and u["slim_passes"] == 0, u
    greedy = httpx.post(url + "/v1/completions", json=body, timeout=120).json()["usage"]["via_sd"]
    assert greedy["slim_passes"] > 0, greedy  # the same prompt alone and greedy does use the slim tier
    wait_idle(url, engine)


def test_structured_outputs_and_a_forced_tool_call_on_vllm(server):
    """vLLM applies the constraint (its guidance backend, the embedded engine's library) with the
    plugin drafting nothing for such a request; the gateway shapes the tool call the same way."""
    import json
    import re

    url, engine = server
    c = client(url)
    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    msgs = [{"role": "user", "content": "Describe a fictional person as JSON with a name and an age."}]
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=80, temperature=0,
                                  response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": person}})
    value = json.loads(r.choices[0].message.content)
    assert r.choices[0].finish_reason == "stop" and set(value) == {"name", "age"}
    # drafts are verified under the grammar (vLLM's masks on every row; the plugin keeps such a
    # batch off the slim tier) and the text is plain decoding's
    off = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=80, temperature=0,
                                    response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": person}},
                                    extra_body={"via_sd": {"mode": "off"}})
    assert off.choices[0].message.content == r.choices[0].message.content
    assert r.usage.via_sd["draft_tokens"] > 0 and r.usage.via_sd["slim_passes"] == 0
    for so, ok in [({"choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
                   ({"regex": "[A-Z][a-z]+ [0-9]{4}"}, lambda t: re.fullmatch("[A-Z][a-z]+ [0-9]{4}", t)),
                   ({"grammar": 'start: answer "."\nanswer: "Yes" | "No"'}, lambda t: t in ("Yes.", "No."))]:
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Is the sky blue?"}],
                                      max_tokens=30, temperature=0, extra_body={"structured_outputs": so})
        assert r.choices[0].finish_reason == "stop" and ok(r.choices[0].message.content), (so, r.choices[0])
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                  tools=[weather], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                  max_tokens=60, temperature=0)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city", "unit"}
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": msgs,
                                                       "structured_outputs": {"regex": "([a-z"}}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs.regex"
    wait_idle(url, engine)


def test_context_length_exceeded_is_400(server):
    url, engine = server
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": MAX_MODEL_LEN + 8},
                   timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "context_length_exceeded"
    r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "word " * (MAX_MODEL_LEN + 10)}], "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert not engine._inflight


def test_full_accept_threshold_reaches_the_plugin(server):
    """`via_sd.full_accept_threshold` per request: outside [0, 1] a 400 naming the field; inside,
    the request runs and its usage counts the drafts kept against the full model's choice."""
    url, engine = server
    body = {"model": MODEL, "prompt": "List the days of the week: Monday, Tuesday, Wednesday, Thursday, Friday, "
            "Saturday, Sunday. Again: Monday,", "max_tokens": 16, "temperature": 0,
            "via_sd": {"full_accept_threshold": 1.5}}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "via_sd.full_accept_threshold"
    body["via_sd"]["full_accept_threshold"] = 0.0
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    u = r.json()["usage"]["via_sd"]
    assert 0 <= u["lenient_accepted"] <= u["accepted"] <= u["draft_tokens"]
    # a request that asks for logprobs is verified exactly (vLLM reads them from the same logits)
    r = httpx.post(url + "/v1/completions", json={**body, "logprobs": 1}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["via_sd"]["lenient_accepted"] == 0
    assert len(r.json()["choices"][0]["logprobs"]["token_logprobs"]) == r.json()["usage"]["completion_tokens"]
    assert not engine._inflight


def test_cancelled_stream_aborts_the_request(server):
    url, engine = server
    before = wait_idle(url, engine)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400,
            "temperature": 0.7, "seed": 1, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=120) as c:
        with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
            assert len(engine._inflight) == 1
    after = wait_idle(url, engine)
    assert not engine._inflight
    assert after[("via_sd_kv_cache_usage_ratio", ())] == 0
    generated = after[("via_sd_generation_tokens_total", ())] - before[("via_sd_generation_tokens_total", ())]
    assert 0 < generated < 400  # aborted, not finished


def test_metrics_parse_and_add_up(server):
    url, engine = server
    wait_idle(url, engine)
    time.sleep(1.5)  # the worker's counters are polled about once a second
    before = scrape(url)
    usages = []
    for i, mode in enumerate(["three_tier", "binary", "three_tier"]):
        r = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": "the cat the cat the cat " * (i + 1), "max_tokens": 16, "temperature": 0,
            "ignore_eos": True, "via_sd": {"mode": mode},
        })
        assert r.status_code == 200, r.text
        usages.append(r.json()["usage"])
    wait_idle(url, engine)
    time.sleep(1.5)
    after = scrape(url)

    def d(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    for name in ("via_sd_tier_decisions_total", "vllm:spec_decode_num_drafts_total",
                 "vllm:spec_decode_num_draft_tokens_total", "vllm:spec_decode_num_accepted_tokens_total",
                 "via_sd_draft_tokens_total", "via_sd_verifier_passes_total"):
        assert any(k[0] == name for k in after), name
    tiers = {t: d("via_sd_tier_decisions_total", tier=t) for t in ("accept", "slim", "full")}
    draft = d("via_sd_draft_tokens_total")
    accepted = d("vllm:spec_decode_num_accepted_tokens_total")
    assert draft > 0
    assert d("vllm:spec_decode_num_draft_tokens_total") == draft
    assert 0 < d("vllm:spec_decode_num_drafts_total") <= draft
    assert sum(tiers.values()) <= draft
    assert tiers["accept"] <= accepted <= tiers["accept"] + tiers["full"]
    assert sum(u["via_sd"]["draft_tokens"] for u in usages) == draft
    assert sum(u["via_sd"]["accepted"] for u in usages) == accepted
    assert sum(u["via_sd"]["slim_passes"] for u in usages) == d("via_sd_verifier_passes_total", verifier="slim")
    assert sum(u["via_sd"]["full_passes"] for u in usages) == d("via_sd_verifier_passes_total", verifier="full")
    assert sum(u["completion_tokens"] for u in usages) == d("via_sd_generation_tokens_total")
    assert sum(u["prompt_tokens"] for u in usages) == d("via_sd_prompt_tokens_total")
    assert d("via_sd_e2e_request_latency_seconds_count") == 3
    assert after[("via_sd_kv_cache_usage_ratio", ())] == 0
    assert after[("via_sd_requests_running", ())] == 0
