"""`via-sd`: serve, generate, bench, calibrate, prepare-model, train-head.

Every subcommand validates its arguments once, here; a bad value ends with a one-line message on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from server.engine.config import DRAFTERS, SPEC_MODES

if TYPE_CHECKING:
    from server.engine.config import EngineConfig


def _die(msg: str, code: int = 2) -> int:
    print(f"via-sd: error: {msg}", file=sys.stderr)
    return code


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=os.environ.get("VIA_SD_MODEL"), help="bundled model name or a local folder")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", default="cpu", help="cpu, or cuda[:N] for a GPU")
    p.add_argument("--prefill-dtype", choices=("auto", "bfloat16"), default="auto",
                   help="the prompt's matrix products in bf16 (lossy, faster on AVX512-BF16 CPUs); auto: the model's dtype")
    p.add_argument("--spec-mode", choices=SPEC_MODES, default=None)
    p.add_argument("--drafter", choices=DRAFTERS, default=None)
    p.add_argument("--num-draft-tokens", type=int, default=None)
    p.add_argument("--accept-threshold", type=float, default=None)
    p.add_argument("--escalate-threshold", type=float, default=None)
    p.add_argument("--slim-route", default=None, help="route JSON of the slim verifier")
    p.add_argument("--draft-head", default=None,
                   help="draft head of the head and hybrid drafters (.safetensors from via-sd train-head); "
                        "default: the one shipped for the model")
    p.add_argument("--full-accept-threshold", type=float, default=None,
                   help="three_tier: the full model keeps a draft token d when q(d) >= this * max q (1: exact)")
    p.add_argument("--slim-confidence", type=float, default=None,
                   help="the slim verifier decides a position only where max q' >= this (default 0.7)")


def engine_config_from_args(args, model_folder) -> "EngineConfig":
    from server.engine.config import EngineConfig, SpecConfig

    spec_kw = {}
    if getattr(args, "spec_mode", None):
        spec_kw["mode"] = args.spec_mode
    if getattr(args, "drafter", None):
        spec_kw["drafter"] = args.drafter
    for name in ("num_draft_tokens", "accept_threshold", "escalate_threshold", "slim_route", "slim_confidence",
                 "full_accept_threshold"):
        v = getattr(args, name, None)
        if v is not None:
            spec_kw[name] = v
    if getattr(args, "draft_head", None):
        spec_kw["head_path"] = args.draft_head
    return EngineConfig(model=str(model_folder), dtype=getattr(args, "dtype", "float32"),
                        device=getattr(args, "device", "cpu"), prefill_dtype=getattr(args, "prefill_dtype", "auto"),
                        spec=SpecConfig(**spec_kw))


def cmd_generate(args) -> int:
    from server.engine.api import GenerationRequest, RequestRejected
    from server.engine.config import ConfigError, SamplingParams, SpecParams
    from server.engine.model_files import prepare_model

    if not args.prompt or not args.prompt.strip():
        return _die("--prompt is empty; give the text to continue")
    if args.max_tokens <= 0:
        return _die(f"--max-tokens must be a positive integer, got {args.max_tokens}")
    if args.temperature < 0:
        return _die(f"--temperature must be >= 0, got {args.temperature}")
    try:
        folder = prepare_model(args.model, progress=not args.json)
    except (ValueError, FileNotFoundError) as e:
        return _die(str(e))
    from server.engine.engine import LLMEngine

    try:
        engine = LLMEngine(engine_config_from_args(args, folder))
    except (ValueError, FileNotFoundError) as e:
        return _die(str(e))
    tok = engine.tokenizer
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}])
    else:
        ids = tok.encode(args.prompt)
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()))
    req = GenerationRequest("generate-0", tuple(ids), sampling, SpecParams(mode=args.spec_mode))
    try:
        res = engine.generate([req])[0]
    except (RequestRejected, ConfigError) as e:
        return _die(str(e))
    usage = {
        "prompt_tokens": len(ids),
        "completion_tokens": len(res.token_ids),
        "total_tokens": len(ids) + len(res.token_ids),
        "via_sd": res.via_sd.to_dict(),
    }
    if args.json:
        print(json.dumps({"text": res.text, "token_ids": res.token_ids, "finish_reason": res.finish_reason,
                          "usage": usage}))
    else:
        print(res.text)
        print(f"[{res.finish_reason}] {usage}", file=sys.stderr)
    return 0


def cmd_prepare_model(args) -> int:
    from server.engine.model_files import prepare_model

    try:
        print(prepare_model(args.model, progress=True))
    except (ValueError, FileNotFoundError) as e:
        return _die(str(e))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="via-sd", description="Three-tier speculative decoding server")
    sub = parser.add_subparsers(dest="cmd", required=True)

    from server.gateway.serve import add_serve_arguments, run_serve

    p = sub.add_parser("serve", help="start the OpenAI-compatible server")
    add_serve_arguments(p)
    p.set_defaults(func=run_serve)

    p = sub.add_parser("generate", help="one generation without a server")
    _add_engine_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("prepare-model", help="convert the bundled model into a model folder (once)")
    p.add_argument("--model", default=None)
    p.set_defaults(func=cmd_prepare_model)

    for name, mod, helptext in (
        ("bench", "server.bench.cli", "Spec-Bench benchmark against peers"),
        ("calibrate", "server.engine.calibrate", "search slim and draft routes for a model"),
        ("train-head", "server.engine.drafters.train_head", "train the draft head on the model's own outputs"),
    ):
        p = sub.add_parser(name, help=helptext, add_help=False)
        p.set_defaults(func=None, module=mod)

    args, rest = parser.parse_known_args(argv)
    if args.func is None:
        import importlib

        try:
            module = importlib.import_module(args.module)
        except ModuleNotFoundError as e:
            return _die(f"`via-sd {args.cmd}` is not available: {e}")
        return int(module.main(rest) or 0)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
