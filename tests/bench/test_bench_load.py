"""`via-sd bench --load`: the pieces without a server, and one short run against a real one."""

import json

import pytest

from server.bench import load
from server.bench.load import RequestResult, percentile, render_load_table, request_body, summarize


def test_percentile_nearest_rank():
    assert percentile([4, 1, 3, 2], 50) == 2
    assert percentile([1, 2, 3, 4], 99) == 4
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile([], 50) is None


def test_request_body_carries_the_mode_extension():
    b = request_body("chat", "m", "hi", 8, "binary")
    assert b["messages"] == [{"role": "user", "content": "hi"}] and b["stream"] is True
    assert b["via_sd"] == {"mode": "binary"} and b["stream_options"] == {"include_usage": True}
    c = request_body("completions", "m", "hi", 8, None)
    assert c["prompt"] == "hi" and "via_sd" not in c


def test_vllm_serve_runs_like_our_engine():
    """fp32, eager, and both servers' prefix cache off by default (the load test sends the same
    prompts at every concurrency) or both on with `--prefix-caching on`."""
    from server.bench.load import build_parser, via_sd_serve_cmd, vllm_serve_cmd

    cmd = vllm_serve_cmd("/py", "/models/m", 8123, 64)
    assert cmd[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert "--no-enable-prefix-caching" in cmd and "--enable-prefix-caching" not in cmd
    assert cmd[cmd.index("--dtype") + 1] == "float32" and "--enforce-eager" in cmd
    assert cmd[cmd.index("--max-num-seqs") + 1] == "64" and cmd[cmd.index("--port") + 1] == "8123"
    ours = via_sd_serve_cmd("/models/m", 8124, 64, "hybrid")
    assert "--no-enable-prefix-caching" in ours and ours[ours.index("--drafter") + 1] == "hybrid"
    assert build_parser().parse_args([]).prefix_caching == "off"
    on = vllm_serve_cmd("/py", "/models/m", 8123, 64, prefix_caching=True)
    assert "--enable-prefix-caching" in on and "--no-enable-prefix-caching" not in on
    assert "--enable-prefix-caching" in via_sd_serve_cmd("/models/m", 8124, 64, None, prefix_caching=True)
    assert ours[ours.index("--kv-cache-dtype") + 1] == "auto" and build_parser().parse_args([]).kv_cache_dtype == "auto"
    half = via_sd_serve_cmd("/models/m", 8124, 64, None, kv_cache_dtype="fp16")
    assert half[half.index("--kv-cache-dtype") + 1] == "fp16"
    assert ours[ours.index("--prefill-dtype") + 1] == "auto" and build_parser().parse_args([]).prefill_dtype == "auto"
    bf = via_sd_serve_cmd("/models/m", 8124, 64, None, prefill_dtype="bfloat16")
    assert bf[bf.index("--prefill-dtype") + 1] == "bfloat16"
    assert "--draft-head" not in ours
    mine = via_sd_serve_cmd("/models/m", 8124, 64, "head", draft_head="/heads/mine.safetensors")
    assert mine[mine.index("--draft-head") + 1] == "/heads/mine.safetensors"


def test_summarize_and_table():
    res = [RequestResult(True, 10, 0.1, 1.0, via_sd={"steps": 3}), RequestResult(True, 6, 0.3, 2.0, via_sd={"steps": 2}),
           RequestResult(False, error="HTTP 429: busy")]
    pt = summarize("three_tier", 4, res, 2.0)
    assert (pt.completed, pt.errors, pt.tokens, pt.tokens_per_s) == (2, 1, 16, 8.0)
    assert pt.ttft_p50_s == 0.1 and pt.ttft_p99_s == 0.3 and pt.first_error.startswith("HTTP 429")
    assert pt.extra == {"via_sd": {"steps": 5}}
    table = render_load_table([vars(pt)])
    assert "three_tier" in table and "2/3" in table and "8.0" in table


def test_round_plan_cuts_the_same_requests_into_shorter_turns():
    from server.bench.load import round_plan

    # default: `rounds` turns of `requests` requests, the first `requests` prompts each time
    assert round_plan(4, 2, None, 4) == [[0, 1, 2, 3], [0, 1, 2, 3]]
    # auto at 4 in flight: turns of 16 requests, the same 2 x 64 requests over the same prompts in order
    plan = round_plan(64, 2, "auto", 4)
    assert len(plan) == 8 and all(len(t) == 16 for t in plan)
    assert [i for t in plan for i in t] == list(range(64)) * 2
    # auto keeps two waves of requests where that leaves four turns a mode, else down to one wave
    # (never less), and two turns at least; a last turn may be short
    assert [len(t) for t in round_plan(64, 2, "auto", 64)] == [64, 64]
    assert [len(t) for t in round_plan(64, 4, "auto", 64)] == [64] * 4
    assert [len(t) for t in round_plan(64, 8, "auto", 64)] == [128] * 4
    assert [len(t) for t in round_plan(2, 2, "auto", 1)] == [1] * 4
    assert [len(t) for t in round_plan(3, 1, "auto", 4)] == [2, 1]
    assert [len(t) for t in round_plan(64, 2, "auto", 16)] == [32] * 4
    assert [len(t) for t in round_plan(64, 4, "auto", 16)] == [32] * 8
    assert [len(t) for t in round_plan(10, 1, "4", 1)] == [4, 4, 2]
    assert round_plan(3, 1, "100", 1) == [[0, 1, 2]]


@pytest.mark.parametrize("argv,msg", [
    (["--concurrency", "a,b"], "--concurrency"),
    (["--concurrency", "0"], "[1, 1024]"),
    (["--rounds", "0"], "--rounds must be in"),
    (["--round-requests", "some"], "--round-requests must be"),
    (["--round-requests", "0"], "--round-requests must be"),
    (["--modes", "fast"], "unknown fast"),
    (["--peers", "sglang"], "only `vllm`"),
])
def test_bad_arguments(argv, msg, capsys):
    assert load.main(argv) == 2
    assert msg in capsys.readouterr().err


@pytest.mark.slow
def test_load_against_a_live_tiny_server(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("VIA_SD_HEAD_MIN_GAIN", "0.3")  # the default's value: recorded, changes nothing
    out = tmp_path / "load.json"
    rc = load.main(["--model", str(tiny_model_dir), "--concurrency", "1,2", "--requests", "2", "--max-tokens", "4",
                    "--modes", "off,three_tier", "--rounds", "2", "--round-requests", "2", "--start-timeout", "120",
                    "--request-timeout", "60", "--out", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    # the modes take turns at each concurrency, twice (A B B A), and each point pools its two rounds
    assert [(p["name"], p["concurrency"]) for p in rep["load"]] == [("off", 1), ("three_tier", 1), ("off", 2), ("three_tier", 2)]
    assert all(p["completed"] == 4 and p["tokens"] > 0 and p["ttft_p50_s"] is not None for p in rep["load"])
    assert all(len(p["extra"]["rounds_tokens_per_s"]) == 2 for p in rep["load"])
    assert rep["load"][1]["extra"]["via_sd"]["steps"] > 0  # three_tier at concurrency 1 speculated
    assert len(rep["git"]["commit"]) == 40 and isinstance(rep["git"]["dirty"], bool)  # what the servers ran
    assert f"- commit: `{rep['git']['commit'][:12]}`" in out.with_suffix(".md").read_text()
    assert rep["environment"]["VIA_SD_HEAD_MIN_GAIN"] == "0.3"
    assert "- environment: " in out.with_suffix(".md").read_text() and "`VIA_SD_HEAD_MIN_GAIN=0.3`" in out.with_suffix(".md").read_text()
    # the same requests in turns of one: four turns a mode, each point still pools all of them
    rc = load.main(["--model", str(tiny_model_dir), "--concurrency", "1", "--requests", "2", "--max-tokens", "4",
                    "--modes", "off,three_tier", "--rounds", "2", "--round-requests", "1", "--start-timeout", "120",
                    "--request-timeout", "60", "--out", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert all(p["completed"] == 4 and len(p["extra"]["rounds_tokens_per_s"]) == 4 for p in rep["load"])
    assert rep["settings"]["round_requests"] == "1"


def test_conversations_take_the_second_turn_or_a_follow_up(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text("\n".join(json.dumps(q) for q in [
        {"question_id": 1, "category": "writing", "turns": ["write a poem", "now shorter"]},
        {"question_id": 2, "category": "qa", "turns": ["who?"]},
    ]) + "\n")
    assert load.conversations(str(f), None) == [["write a poem", "now shorter"], ["who?", load.FOLLOW_UP]]
    assert load.conversations(str(f), ["qa"]) == [["who?", load.FOLLOW_UP]]
    body = request_body("chat", "m", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], 4, None)
    assert [m["role"] for m in body["messages"]] == ["user", "assistant"]


def test_second_turns_are_summarized_on_their_own():
    res = [RequestResult(True, 4, 0.5, 1.0, turn=1), RequestResult(True, 4, 0.1, 1.0, turn=2, cached=32),
           RequestResult(True, 4, 0.7, 1.0, turn=1), RequestResult(True, 4, 0.2, 1.0, turn=2, cached=48)]
    pt = summarize("off", 2, res, 4.0)
    assert pt.extra["turn2_ttft_p50_s"] == 0.1 and pt.extra["turn2_ttft_p99_s"] == 0.2
    assert pt.extra["cached_prompt_tokens"] == 80 and pt.ttft_p99_s == 0.7
    assert "turn-2 TTFT p50" in render_load_table([vars(pt)])


@pytest.mark.slow
def test_two_turn_conversations_find_their_first_turn_cached(tiny_model_dir, tmp_path):
    out = tmp_path / "load.json"
    rc = load.main(["--model", str(tiny_model_dir), "--concurrency", "2", "--requests", "2", "--max-tokens", "24",
                    "--modes", "off", "--turns", "2", "--prefix-caching", "on", "--start-timeout", "120",
                    "--request-timeout", "60", "--out", str(out)])
    assert rc == 0
    (pt,) = json.loads(out.read_text())["load"]
    assert pt["requests"] == pt["completed"] == 4  # two conversations, two turns each
    assert pt["extra"]["turn2_ttft_p50_s"] is not None and pt["extra"]["cached_prompt_tokens"] > 0


def test_each_point_of_a_two_turn_run_opens_with_its_own_system_message(monkeypatch):
    """So that with a prefix cache no point reads another point's conversations."""
    import asyncio

    seen = []

    async def fake_one_request(client, url, body, timeout_s):
        seen.append(body["messages"])
        return RequestResult(True, 2, 0.1, 0.2, text="answer")

    monkeypatch.setattr(load, "one_request", fake_one_request)
    for tag in ("A", "B"):
        res, _ = asyncio.run(load.run_batch("http://x", "chat", "m", [["q1", "q2"]], 1, 1, 4, None, 5, system=tag))
        assert [r.turn for r in res] == [1, 2]
    assert [[m["role"] for m in msgs] for msgs in seen] == [["system", "user"], ["system", "user", "assistant", "user"]] * 2
    assert seen[0][0]["content"] == "A" and seen[2][0]["content"] == "B" and seen[1][2]["content"] == "answer"
