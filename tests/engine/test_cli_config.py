"""`via-sd generate`'s engine flags become the EngineConfig they name."""

import argparse

from server import cli


def _config(argv: list[str]):
    p = argparse.ArgumentParser()
    cli._add_engine_args(p)
    return cli.engine_config_from_args(p.parse_args(argv), "/models/m")


def test_prefill_dtype_and_spec_flags_reach_the_config():
    cfg = _config([])
    assert cfg.prefill_dtype == "auto" and cfg.model == "/models/m"
    cfg = _config(["--prefill-dtype", "bfloat16", "--spec-mode", "binary", "--drafter", "ngram"])
    assert cfg.prefill_dtype == "bfloat16" and cfg.spec.mode == "binary" and cfg.spec.drafter == "ngram"
    assert cfg.spec.head_path is None
    assert _config(["--draft-head", "/heads/mine.safetensors"]).spec.head_path == "/heads/mine.safetensors"
    assert _config(["--full-accept-threshold", "0.2"]).spec.full_accept_threshold == 0.2
