"""The gateway over the embedded engine with the tiny random Llama: the SDK, metrics that add
up, and a cancelled stream that returns every KV block. (Error injection stays with the fake.)"""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.engine.config import EngineConfig, SpecConfig
from server.gateway.app import create_app
from tests.gateway.conftest import running_server
from tests.gateway.test_openai_sdk import check_chat_and_completions

async_engine = pytest.importorskip("server.engine.async_engine", reason="the embedded async engine is not in the tree")
testing = pytest.importorskip("server.engine.testing", reason="the tiny model writer is not in the tree")

MODEL = "tiny"


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    folder = testing.write_tiny_model(tmp_path_factory.mktemp("model") / "tiny")
    config = EngineConfig(model=str(folder), num_blocks=128, max_num_seqs=4, spec=SpecConfig(mode="three_tier"))
    engine = async_engine.EmbeddedAsyncEngine(config)
    # Import and compile in this thread first: CPython 3.11 before 3.11.8 can fail with "AST
    # constructor recursion depth mismatch" when two threads compile at once (the server thread
    # importing the engine while another compiles the jinja chat template).
    import server.engine.engine  # noqa: F401

    engine.tokenizer.apply_chat_template([{"role": "user", "content": "warm up"}])
    app = create_app(engine, api_key=None, served_model_names=[MODEL], lifespan_start=True, shutdown_grace_s=5)
    with running_server(app, start_timeout_s=60) as url:
        yield url, engine


def scrape(url: str) -> dict:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def wait_idle(engine, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = engine.stats()
        if s.requests_running == 0 and s.requests_waiting == 0 and s.kv_cache_usage == 0:
            return s
        time.sleep(0.02)
    raise AssertionError(f"the engine did not go idle: {engine.stats()}")


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0)


def test_sdk_on_real_engine_without_speculation(real_server):
    url, engine = real_server
    assert engine.is_ready() and httpx.get(url + "/health").status_code == 200
    # logprobs are checked on their own below (the engine's spec path is still in flux there)
    check_chat_and_completions(client(url), MODEL, max_tokens=20, extra_body={"via_sd": {"mode": "off"}}, logprobs=False)
    wait_idle(engine)


def test_tokenize_counts_what_the_routes_run_on_the_real_tokenizer(real_server):
    url, engine = real_server
    msgs = [{"role": "user", "content": "Name a color."}]
    chat = client(url).chat.completions.create(model=MODEL, messages=msgs, max_tokens=1, temperature=0)
    tok = httpx.post(url + "/tokenize", json={"messages": msgs, "return_token_strs": True}, timeout=30).json()
    assert tok["count"] == chat.usage.prompt_tokens and tok["max_model_len"] == engine.max_model_len
    assert tok["token_strs"][0] == "<|im_start|>"
    comp = client(url).completions.create(model=MODEL, prompt="The sky is", max_tokens=1, temperature=0)
    ids = httpx.post(url + "/tokenize", json={"prompt": "The sky is"}, timeout=30).json()["tokens"]
    assert len(ids) == comp.usage.prompt_tokens
    back = httpx.post(url + "/detokenize", json={"tokens": tok["tokens"]}, timeout=30).json()["prompt"]
    assert back.startswith("<|im_start|>") and "Name a color." in back
    # vLLM's continue_final_message through the model's own template: the answer is left open
    msgs += [{"role": "assistant", "content": "My favourite color is"}]
    opts = {"continue_final_message": True, "add_generation_prompt": False}
    ids = httpx.post(url + "/tokenize", json={"messages": msgs, **opts}, timeout=30).json()["tokens"]
    text = httpx.post(url + "/detokenize", json={"tokens": ids}, timeout=30).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\nMy favourite color is"), text
    cont = client(url).chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0, extra_body=opts)
    assert cont.usage.prompt_tokens == len(ids) and cont.choices[0].message.content
    wait_idle(engine)


@pytest.mark.parametrize("mode", ["binary", "three_tier"])
def test_sdk_streams_join_on_real_engine(real_server, mode):
    url, engine = real_server
    c = client(url)
    msgs = [{"role": "user", "content": "abc abc abc abc"}]
    extra = {"via_sd": {"mode": mode}}
    full = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=30, temperature=0, extra_body=extra)
    chunks = list(c.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=30, temperature=0, stream=True, extra_body=extra,
        stream_options={"include_usage": True},
    ))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    comp = c.completions.create(model=MODEL, prompt="xyz xyz xyz", max_tokens=25, temperature=0, extra_body=extra)
    pieces = list(c.completions.create(model=MODEL, prompt="xyz xyz xyz", max_tokens=25, temperature=0,
                                       stream=True, extra_body=extra))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == comp.choices[0].text
    wait_idle(engine)


@pytest.mark.parametrize("mode", ["off", "three_tier"])
def test_logprobs_on_real_engine(real_server, mode):
    url, engine = real_server
    r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "abc abc abc"}], "max_tokens": 16,
        "temperature": 0, "logprobs": True, "top_logprobs": 2, "via_sd": {"mode": mode},
    })
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"]
    wait_idle(engine)


def test_metrics_add_up_on_real_engine(real_server):
    url, engine = real_server
    wait_idle(engine)
    before = scrape(url)
    usages = []
    for i, mode in enumerate(["three_tier", "binary", "three_tier"]):
        r = httpx.post(url + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": "the cat the cat the cat " * (i + 1), "max_tokens": 24, "temperature": 0,
            "via_sd": {"mode": mode},
        })
        assert r.status_code == 200, r.text
        usages.append(r.json()["usage"])
    wait_idle(engine)
    after = scrape(url)

    def d(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    tiers = {t: d("via_sd_tier_decisions_total", tier=t) for t in ("accept", "slim", "full")}
    draft = d("via_sd_draft_tokens_total")
    accepted = d("vllm:spec_decode_num_accepted_tokens_total")
    assert draft > 0
    assert sum(tiers.values()) <= draft
    assert tiers["accept"] <= accepted <= tiers["accept"] + tiers["full"]
    assert d("vllm:spec_decode_num_draft_tokens_total") == draft
    assert sum(u["via_sd"]["draft_tokens"] for u in usages) == draft
    assert sum(u["via_sd"]["accepted"] for u in usages) == accepted
    assert sum(u["completion_tokens"] for u in usages) == d("via_sd_generation_tokens_total")
    assert sum(u["prompt_tokens"] for u in usages) == d("via_sd_prompt_tokens_total")
    assert d("via_sd_e2e_request_latency_seconds_count") == 3
    assert after[("via_sd_kv_cache_usage_ratio", ())] == 0


def test_a_repeated_prompt_reports_its_cached_tokens(real_server):
    """The prefix cache through the API: OpenAI's `usage.prompt_tokens_details.cached_tokens`
    and the hit counters (ours and vLLM's names) agree, and the text is the same."""
    url, engine = real_server
    wait_idle(engine)
    before = scrape(url)
    c = client(url)
    msgs = [{"role": "user", "content": "a long question that is asked twice, word for word: " + "why? " * 12}]
    first = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0,
                                      extra_body={"via_sd": {"mode": "off"}})
    second = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0,
                                       extra_body={"via_sd": {"mode": "off"}})
    wait_idle(engine)
    after = scrape(url)
    n = first.usage.prompt_tokens
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert cached == (n - 1) // 16 * 16 > 0 and second.choices[0].message.content == first.choices[0].message.content
    hits = after[("via_sd_prefix_cache_hits_total", ())] - before.get(("via_sd_prefix_cache_hits_total", ()), 0.0)
    assert hits == cached == after[("vllm:prefix_cache_hits_total", ())] - before.get(("vllm:prefix_cache_hits_total", ()), 0.0)
    queries = after[("via_sd_prefix_cache_queries_total", ())] - before.get(("via_sd_prefix_cache_queries_total", ()), 0.0)
    assert queries == 2 * n


def test_cancelled_stream_returns_every_block_on_real_engine(real_server):
    url, engine = real_server
    before = wait_idle(engine).generation_tokens
    if hasattr(engine, "fault_hook"):  # slow the steps so that the close surely comes first
        engine.fault_hook = lambda _engine: time.sleep(0.01)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 400,
            "temperature": 0.7, "seed": 1, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
            assert engine.stats().requests_running == 1 and engine.stats().kv_cache_usage > 0
    try:
        s = wait_idle(engine)
    finally:
        if hasattr(engine, "fault_hook"):
            engine.fault_hook = None
    assert 0 < s.generation_tokens - before < 400  # aborted, not finished


def test_engine_step_failure_is_500_and_frees_blocks(real_server):
    url, engine = real_server
    if not hasattr(engine, "fault_hook"):
        pytest.skip("this engine has no fault hook")
    wait_idle(engine)

    def boom(_engine):
        raise RuntimeError("injected step failure")

    engine.fault_hook = boom
    try:
        r = httpx.post(url + "/v1/completions", timeout=60,
                       json={"model": MODEL, "prompt": "fail me", "max_tokens": 8})
    finally:
        engine.fault_hook = None
    assert r.status_code == 500, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    wait_idle(engine)
    ok = httpx.post(url + "/v1/completions", timeout=60, json={"model": MODEL, "prompt": "fine", "max_tokens": 4})
    assert ok.status_code == 200
