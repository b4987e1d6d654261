"""Structured outputs through the gateway: `response_format`, vLLM's `structured_outputs`, and
tool calls forced by `tool_choice`. The 400s over the fake engine; the rest with the bundled model
over HTTP through the openai SDK, where the JSON must parse and follow its schema."""

from __future__ import annotations

import json
import re

import openai
import pytest

from tests.gateway.conftest import client_for, running_server
from tests.gateway.fake_engine import FakeEngine

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 30}},
                                       "required": ["timezone"], "additionalProperties": False}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
USER = [{"role": "user", "content": "What is the weather in Paris today?"}]


@pytest.mark.anyio
@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a+"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "([a-z"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"json": "{oops"}}, "structured_outputs.json"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"tools": [WEATHER]}, "tool_choice"),  # "auto": no tool-call parser here, as vLLM without one
    ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
async def test_bad_constraints_and_tool_choices_are_400s_that_start_nothing(body, param):
    engine = FakeEngine()
    async with client_for(engine) as c:
        r = await c.post("/v1/chat/completions", json={"model": "fake", "messages": USER, **body})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.json()
        assert r.json()["error"]["type"] == "invalid_request_error"
        # the same constraint on completions where it applies there
        if "tools" not in body and "tool_choice" not in body and "functions" not in body:
            r = await c.post("/v1/completions", json={"model": "fake", "prompt": "hi", **body})
            assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert engine.requests == [] and engine.stats().requests_running == 0


@pytest.mark.anyio
async def test_tool_choice_none_and_a_tool_history_render_through_the_template():
    engine = FakeEngine()
    msgs = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]
    async with client_for(engine) as c:
        r = await c.post("/v1/chat/completions", json={"model": "fake", "messages": msgs, "tools": [WEATHER],
                                                       "tool_choice": "none", "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["tool_calls"] == []
        prompt = engine.tokenizer.decode(list(engine.requests[-1].prompt_token_ids), skip_special_tokens=False)
        assert 'assistant\n[{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}]' in prompt
        assert "tool\n18 degrees, sunny" in prompt
        bad = msgs[:1] + [{**msgs[1], "tool_calls": [{"id": "c", "type": "function",
                                                      "function": {"name": "f", "arguments": "{oops"}}]}]
        r = await c.post("/v1/chat/completions", json={"model": "fake", "messages": bad, "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages.1.tool_calls"


# ----------------------------------------------------------------------------- the bundled model


@pytest.fixture(scope="module")
def server(real_model_dir):
    from server.engine.async_engine import EmbeddedAsyncEngine
    from server.engine.config import EngineConfig, SpecConfig
    from server.gateway.app import create_app

    engine = EmbeddedAsyncEngine(EngineConfig(model=str(real_model_dir), num_blocks=256, max_num_seqs=4,
                                              spec=SpecConfig(mode="three_tier")))
    engine.tokenizer.apply_chat_template([{"role": "user", "content": "warm up"}])
    app = create_app(engine, api_key=None, served_model_names=["smol"], lifespan_start=True, shutdown_grace_s=5)
    with running_server(app, start_timeout_s=120) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=120, max_retries=0), engine


def follows_person(text: str) -> dict:
    value = json.loads(text)
    assert set(value) == {"name", "age"} and isinstance(value["name"], str) and 0 <= value["age"] <= 150
    return value


@pytest.mark.real_model
def test_response_format_json_schema_and_json_object(server):
    client, engine = server
    msgs = [{"role": "user", "content": "Describe a fictional person as JSON with a name and an age."}]
    for temperature in (0.0, 1.0):
        r = client.chat.completions.create(
            model="smol", messages=msgs, max_tokens=80, temperature=temperature, seed=3,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
        assert r.choices[0].finish_reason == "stop"
        follows_person(r.choices[0].message.content)
        # it speculated (the server's three_tier), and gave what plain decoding gives
        off = client.chat.completions.create(
            model="smol", messages=msgs, max_tokens=80, temperature=temperature, seed=3,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
            extra_body={"via_sd": {"mode": "off"}})
        assert off.choices[0].message.content == r.choices[0].message.content
        assert off.usage.via_sd["draft_tokens"] == 0 < r.usage.via_sd["draft_tokens"]
    r = client.chat.completions.create(model="smol", messages=msgs, max_tokens=120, temperature=0,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    # completions take response_format too (as vLLM's do)
    c = client.completions.create(model="smol", prompt="A person as JSON:", max_tokens=80, temperature=0,
                                  extra_body={"response_format": {"type": "json_schema",
                                                                  "json_schema": {"name": "p", "schema": PERSON}}})
    assert c.choices[0].finish_reason == "stop"
    follows_person(c.choices[0].text)
    # streamed: the deltas join to the same text
    stream = client.chat.completions.create(
        model="smol", messages=msgs, max_tokens=80, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    chunks = list(stream)
    whole = client.chat.completions.create(
        model="smol", messages=msgs, max_tokens=80, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.real_model
def test_vllm_structured_outputs_choice_regex_and_grammar(server):
    client, _ = server
    msgs = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]
    cases = [({"choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
             ({"regex": r"[A-Z][a-z]+ [0-9]{4}"}, lambda t: re.fullmatch(r"[A-Z][a-z]+ [0-9]{4}", t)),
             ({"grammar": 'start: answer "."\nanswer: "Yes" | "No"'}, lambda t: t in ("Yes.", "No.")),
             ({"json": json.dumps(PERSON), "disable_any_whitespace": True}, lambda t: " " not in t.replace(
                 json.loads(t)["name"], "") and follows_person(t))]
    for so, ok in cases:
        r = client.chat.completions.create(model="smol", messages=msgs, max_tokens=40, temperature=0,
                                           extra_body={"structured_outputs": so})
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop" and ok(text), (so, text)


@pytest.mark.real_model
def test_a_named_tool_choice_returns_a_call_with_arguments_that_follow_its_parameters(server):
    client, engine = server
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="smol", messages=USER, tools=[WEATHER, TIME], tool_choice=choice,
                                       max_tokens=60, temperature=0)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    (call,) = ch.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")
    # streamed: the first delta names the call, the arguments' pieces join to the same JSON
    chunks = list(client.chat.completions.create(model="smol", messages=USER, tools=[WEATHER, TIME],
                                                 tool_choice=choice, max_tokens=60, temperature=0, stream=True))
    deltas = [d for ch in chunks for d in (ch.choices[0].delta.tool_calls or [])] if chunks else []
    assert deltas[0].id and deltas[0].function.name == "get_weather" and deltas[0].type == "function"
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:])
    assert "".join(d.function.arguments for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(ch.choices[0].delta.content for ch in chunks if ch.choices)
    # cut by max_tokens: no call, the text as it is
    r = client.chat.completions.create(model="smol", messages=USER, tools=[WEATHER], tool_choice=choice,
                                       max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content.startswith("{")


@pytest.mark.real_model
def test_tool_choice_required_returns_calls_among_the_tools_and_a_conversation_goes_on(server):
    client, engine = server
    # (the bundled model, whose chat template does not show tools, repeats a call until max_tokens
    # when it may make several; parallel_tool_calls false allows one)
    r = client.chat.completions.create(model="smol", messages=USER, tools=[WEATHER, TIME], tool_choice="required",
                                       max_tokens=120, temperature=0, parallel_tool_calls=False)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
    for call in ch.message.tool_calls:
        args = json.loads(call.function.arguments)
        assert call.function.name in ("get_weather", "get_time")
        assert set(args) == ({"city", "unit"} if call.function.name == "get_weather" else {"timezone"})
    chunks = list(client.chat.completions.create(model="smol", messages=USER, tools=[WEATHER, TIME],
                                                 tool_choice="required", max_tokens=120, temperature=0, stream=True,
                                                 parallel_tool_calls=False))
    streamed = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])] if chunks else []
    assert [(d.index, d.function.name, d.function.arguments) for d in streamed] == [
        (i, c.function.name, c.function.arguments) for i, c in enumerate(ch.message.tool_calls)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the call and the tool's answer go back in; the model answers in text
    msgs = USER + [ch.message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": "18 degrees and sunny"} for c in ch.message.tool_calls]
    r = client.chat.completions.create(model="smol", messages=msgs, tools=[WEATHER, TIME], tool_choice="none",
                                       max_tokens=30, temperature=0)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    stats = engine.stats()
    assert stats.requests_running == 0 and stats.kv_cache_usage == 0.0


@pytest.mark.real_model
def test_penalties_and_a_bias_speculate_and_give_what_plain_decoding_gives(server):
    client, engine = server
    msgs = [{"role": "user", "content": "Write the days of the week, one per line, then write them again."}]
    kw = dict(model="smol", messages=msgs, max_tokens=60, temperature=0, frequency_penalty=0.3,
              presence_penalty=0.2, logit_bias={"28": -2})
    spec = client.chat.completions.create(**kw)
    off = client.chat.completions.create(**kw, extra_body={"via_sd": {"mode": "off"}})
    assert spec.choices[0].message.content == off.choices[0].message.content
    assert spec.usage.via_sd["draft_tokens"] > 0 and spec.usage.via_sd["accepted"] > 0
    assert off.usage.via_sd["draft_tokens"] == 0
