"""Prompt selection (categories, the mt_bench group, limits) and row naming."""

import json

import pytest

from server.bench.prompts import PromptFileError, interleave_categories, read_questions, select_prompts
from server.bench.rows import RowError, build_rows, parse_list
from server.bench.sweep import parse_sweep, sweep_points, sweep_row

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["w1", "w2"]},
    {"question_id": 91, "category": "roleplay", "turns": ["r1"]},
    {"question_id": 161, "category": "translation", "turns": ["t1"], "reference": ["ref t1"]},
    {"question_id": 162, "category": "translation", "turns": ["t2"], "reference": ["ref t2"]},
]


def test_default_selection_groups_mt_bench_and_keeps_the_first_turn():
    ps = select_prompts(QUESTIONS)
    assert [(p.question_id, p.category, p.text) for p in ps] == [
        (81, "mt_bench", "w1"), (91, "mt_bench", "r1"), (161, "translation", "t1"), (162, "translation", "t2")]
    assert ps[2].references == ("ref t1",)


def test_limit_per_category_and_raw_mt_bench_category():
    ps = select_prompts(QUESTIONS, ["mt_bench", "translation"], limit_per_category=1)
    assert [p.question_id for p in ps] == [81, 161]
    assert [p.category for p in select_prompts(QUESTIONS, ["roleplay"])] == ["roleplay"]


def test_load_prompts_take_the_categories_in_turn():
    ps = interleave_categories(select_prompts(QUESTIONS))  # mt_bench 81, 91; translation 161, 162
    assert [p.question_id for p in ps] == [81, 161, 91, 162]
    assert interleave_categories([]) == []


def test_unknown_category_is_named():
    with pytest.raises(PromptFileError, match="nope"):
        select_prompts(QUESTIONS, ["nope"])


def test_read_questions_reports_the_bad_line(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps(QUESTIONS[0]) + "\n{bad\n")
    with pytest.raises(PromptFileError, match=":2:"):
        read_questions(f)
    with pytest.raises(PromptFileError, match="does not exist"):
        read_questions(tmp_path / "missing.jsonl")


def test_row_names():
    rows = build_rows(["off", "binary", "three_tier"], ["ngram", "head"], ["hf", "hf_pld", "vllm", "vllm_ngram"])
    assert [r.name for r in rows] == ["off", "binary", "binary_head", "three_tier", "three_tier_head",
                                      "hf", "hf_pld", "vllm", "vllm_ngram"]
    assert rows[6].prompt_lookup_num_tokens == 10 and rows[8].speculative_config["method"] == "ngram"
    assert not rows[0].drafts and rows[1].drafts and not rows[5].drafts and rows[6].drafts


def test_vllm_three_tier_row_runs_the_plugin_worker_on_the_same_drafts_as_vllm_ngram():
    ngram, ours = build_rows([], [], ["vllm_ngram", "vllm_three_tier"])
    assert ours.kind == "vllm" and ours.speculative_config == ngram.speculative_config
    kw = ours.to_dict()["vllm_kwargs"]
    assert kw["worker_cls"] == "server.vllm_plugin.worker.ViaSDCPUWorker"
    from server.vllm_plugin.settings import PluginSettings

    settings = PluginSettings.from_dict(kw["additional_config"]["via_sd"])  # the plugin accepts them
    assert settings.mode == "three_tier" and settings.schedule == "skip"
    assert kw["enable_prefix_caching"] is False


def test_every_vllm_row_runs_without_a_prefix_cache():
    """Our engine has none: with it vLLM would reuse the warm-up's prompt and every prompt's chat
    template."""
    from server.bench.vllm_worker import llm_kwargs

    for row in build_rows([], [], ["vllm", "vllm_ngram", "vllm_three_tier"]):
        job = {"row": row.to_dict(), "model": "/m", "seed": 0, "max_model_len": 2048}
        kw = llm_kwargs(job)
        assert kw["enable_prefix_caching"] is False and kw["dtype"] == "float32" and kw["enforce_eager"]
        assert ("speculative_config" in kw) == (row.name != "vllm")


def test_bad_lists_are_rejected():
    with pytest.raises(RowError, match="choose from"):
        parse_list("off,fast", ("off", "binary"), "--modes")
    with pytest.raises(RowError):
        build_rows(["off"], ["nope"], [])


def test_sweep_parsing_and_points():
    grid = parse_sweep("a=0.6,0.8;gamma=3,5")
    assert grid == {"accept_threshold": [0.6, 0.8], "num_draft_tokens": [3, 5]}
    one = sweep_points(grid, "one_at_a_time")
    assert {} in one and {"accept_threshold": 0.6} in one and {"num_draft_tokens": 3} in one
    assert len(sweep_points(grid, "full")) == 4
    # escalate (default 0.5) above accept is dropped
    assert sweep_points({"accept_threshold": [0.3, 0.8]}, "one_at_a_time") == [{}, {"accept_threshold": 0.8}]
    assert sweep_row({"accept_threshold": 0.8, "num_draft_tokens": 3}).name == "three_tier[a=0.8,g=3]"
    assert sweep_row({}).name == "three_tier"
    grid = parse_sweep("f=0.1,0.3;r=0,4")
    assert grid == {"full_accept_threshold": [0.1, 0.3], "lenient_no_repeat": [0, 4]}
    assert all(isinstance(v, int) for v in grid["lenient_no_repeat"])
    assert sweep_row({"full_accept_threshold": 0.1, "lenient_no_repeat": 0}).name == "three_tier[f=0.1,r=0]"
    with pytest.raises(RowError):
        parse_sweep("zeta=1")


def test_sweep_turns_the_controller_off_for_every_point_of_a_full_grid():
    grid = parse_sweep("ctl=0;a=0.5,0.9")
    assert grid == {"controller": [False], "accept_threshold": [0.5, 0.9]}
    pts = sweep_points(grid, "full")
    assert pts == [{"controller": False, "accept_threshold": 0.5}, {"controller": False, "accept_threshold": 0.9}]
    assert sweep_row(pts[0], "hybrid").name == "three_tier_hybrid[a=0.5,ctl=0]"
    # the engine default (controller on) is not a point of its own
    assert sweep_points(parse_sweep("controller=1"), "one_at_a_time") == [{}]
    with pytest.raises(RowError):
        parse_sweep("controller=2")


def test_one_value_holds_for_every_point_of_a_one_at_a_time_sweep():
    """`ctl=0;e=0.2` given once: every point runs with the controller off and escalation at 0.2,
    and the other keys vary one at a time from there (the default `--sweep`)."""
    pts = sweep_points(parse_sweep("ctl=0;e=0.2;a=0.3,0.7,0.9;c=0.5,0.9"), "one_at_a_time")
    given = {"controller": False, "escalate_threshold": 0.2}
    assert pts == [given, {**given, "accept_threshold": 0.3}, {**given, "accept_threshold": 0.9},
                   {**given, "slim_confidence": 0.5}, {**given, "slim_confidence": 0.9}]
    default = sweep_points(parse_sweep("default"), "one_at_a_time")
    assert default[0] == given and len(default) == 1 + 3 + 3 + 2 + 2
    assert all(p["controller"] is False and p["escalate_threshold"] == 0.2 for p in default)
