"""`via-sd calibrate`: search the slim verifier's route (and the `self` drafter's) for a model.

Calibration text is the model's own greedy answers to `CALIBRATION_PROMPTS` below, instructions
written for this purpose in the MT-Bench style (none is a Spec-Bench question). Matchness of a
route is the share of answer positions where its argmax equals the full model's; the search
(via_sd_kernels.route_search) maximises it at a target cost. The output JSON carries the route,
its matchness, its cost and how it was made; `--table` also prints matchness against cost for
several costs and minimum shared-prefix lengths, the numbers that say what a slim tier can buy on
this model.

    via-sd calibrate --model SmolLM2-135M-Instruct --cost 0.8 --out slim.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

CALIBRATION_PROMPTS = [
    "Write a short poem about the first snow of winter in a quiet village.",
    "Explain to a ten-year-old why the sky looks blue during the day.",
    "Give three tips for staying focused while studying for exams.",
    "Write a Python function that checks whether a number is prime, with a docstring.",
    "What are the main differences between a list and a tuple in Python?",
    "A shop sells pens at 3 dollars each and notebooks at 5 dollars each. How much do 4 pens and 2 notebooks cost?",
    "Summarize the plot of a story about a lighthouse keeper who finds a message in a bottle.",
    "Describe the water cycle in four steps.",
    "Draft a polite email asking a colleague to move a meeting to Thursday afternoon.",
    "List five healthy breakfast ideas and say why each is good for you.",
    "What causes the seasons on Earth?",
    "Translate to French: 'The library opens at nine and closes at six.'",
    "Pretend you are a tour guide in Rome and welcome a group of visitors.",
    "Extract the dates from this sentence: 'We met on 3 May 2021, moved on 14 June 2022 and married on 1 July 2023.'",
    "Compare renewable and non-renewable energy sources in a short paragraph.",
    "Write a JavaScript snippet that sums the numbers in an array.",
    "If a train travels 60 km in 45 minutes, what is its average speed in km per hour? Explain.",
    "Give a brief history of the printing press.",
    "What is photosynthesis and why is it important?",
    "Write a haiku about the ocean at night.",
    "Explain what a neural network is in simple terms.",
    "Suggest a weekend itinerary for a family visiting a national park.",
    "Why is it important to get enough sleep?",
    "Write a SQL query that returns the ten most recent orders from a table named orders.",
]


def calibration_data(engine, n_prompts: int, max_tokens: int) -> list[tuple[list[int], int]]:
    """(token ids of prompt + greedy answer, prompt length) for each calibration prompt."""
    from server.engine.api import GenerationRequest
    from server.engine.config import SamplingParams, SpecParams

    reqs = []
    for i, p in enumerate(CALIBRATION_PROMPTS[:n_prompts]):
        ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": p}])
        reqs.append(GenerationRequest(f"cal{i}", tuple(ids), SamplingParams(max_tokens=max_tokens, temperature=0),
                                      SpecParams(mode="off")))
    res = engine.generate(reqs)
    return [(list(r.prompt_token_ids) + r.token_ids, len(r.prompt_token_ids)) for r in res]


class RouteEvaluator:
    """Runs a route over the calibration sequences (one ragged forward, a scratch block table)
    and compares its argmax with the full model's greedy tokens."""

    def __init__(self, engine, data: list[tuple[list[int], int]], confident: float = 0.7):
        from server.engine.kv_cache import Chunk

        self.engine = engine
        self.data = data
        self.confident = confident
        self.tables = [engine.cache.new_table() for _ in data]
        self.chunks = []
        targets = []
        for (ids, n_prompt), t in zip(data, self.tables):
            t.ensure(engine.cache.pool, len(ids))
            n_ans = len(ids) - n_prompt
            # logits at positions n_prompt-1 .. len-2 predict the answer tokens
            self.chunks.append(Chunk(t, 0, ids[:-1], n_ans))
            targets.extend(ids[n_prompt:])
        self.targets = torch.tensor(targets)
        self.num_evals = 0
        self.last_detail: dict = {}

    def __call__(self, route) -> float:
        out = self.engine.runner.forward(self.chunks, route)
        probs = out.logits.softmax(-1)
        conf, arg = probs.max(-1)
        match = arg == self.targets
        sure = conf >= self.confident
        self.num_evals += 1
        self.last_detail = {
            "matchness": float(match.float().mean()),
            "confident_share": float(sure.float().mean()),
            "matchness_when_confident": float(match[sure].float().mean()) if bool(sure.any()) else 0.0,
        }
        return self.last_detail["matchness"]

    def close(self) -> None:
        for t in self.tables:
            t.release(self.engine.cache.pool)


def main(argv: list[str] | None = None) -> int:
    from server.engine.config import EngineConfig, SpecConfig
    from server.engine.engine import LLMEngine
    from server.engine.model_files import prepare_model
    from via_sd_kernels.route_search import search_route
    from via_sd_kernels.routes import Route

    ap = argparse.ArgumentParser(prog="via-sd calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--cost", type=float, default=0.8, help="target cost of the route, relative to the full model")
    ap.add_argument("--out", required=True, help="route JSON to write")
    ap.add_argument("--kind", choices=("slim", "draft"), default="slim")
    ap.add_argument("--within", default=None, help="draft routes: a slim route JSON the draft route must be inside")
    ap.add_argument("--min-prefix-layers", type=int, default=0)
    ap.add_argument("--budget", type=int, default=60)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table", default=None, help="also write a Markdown table of matchness against cost and prefix")
    args = ap.parse_args(argv)
    if not (0.05 < args.cost <= 1.0):
        print("via-sd calibrate: error: --cost must be in (0.05, 1]", file=sys.stderr)
        return 2
    folder = prepare_model(args.model, progress=True)
    engine = LLMEngine(EngineConfig(model=str(folder), spec=SpecConfig(mode="off")))
    t0 = time.time()
    data = calibration_data(engine, args.prompts, args.max_tokens)
    ev = RouteEvaluator(engine, data)
    costs = engine.spec.costs
    n = engine.model.cfg.num_layers
    within = None
    if args.within:
        from server.engine.spec_step import load_route

        within = load_route(args.within)

    def evaluate(route: Route) -> float:
        if within is not None:
            route = _intersect(route, within)
        return ev(route)

    res = search_route(n, evaluate, costs, args.cost, budget=args.budget, seed=args.seed,
                       min_prefix_layers=args.min_prefix_layers)
    route = _intersect(res.route, within) if within is not None else res.route
    ev(route)
    detail = dict(ev.last_detail)
    route = Route(route.num_layers, route.attn, route.mlp, name=f"{args.kind}@{args.cost}")
    record = {
        "route": route.to_dict(),
        "cost": route.cost(costs),
        "shared_prefix_sublayers": route.shared_prefix_sublayers(),
        **detail,
        "model": folder.name,
        "calibration": {"prompts": args.prompts, "max_tokens": args.max_tokens, "positions": int(ev.targets.numel()),
                        "budget": args.budget, "seed": args.seed, "min_prefix_layers": args.min_prefix_layers,
                        "target_cost": args.cost, "seconds": round(time.time() - t0, 1)},
        "command": "via-sd calibrate " + " ".join(argv if argv is not None else sys.argv[2:]),
    }
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps({k: v for k, v in record.items() if k != "route"}, indent=1))
    print(route)
    if args.table:
        rows = ["| target cost | min prefix layers | route cost | shared prefix (sub-layers) | matchness | "
                "confident share (p>=0.7) | matchness when confident |", "|---|---|---|---|---|---|---|"]
        for cost in (0.9, 0.8, 0.7):
            for prefix in (0, n // 3):
                r = search_route(n, ev, costs, cost, budget=max(8, args.budget // 3), seed=args.seed,
                                 min_prefix_layers=prefix)
                ev(r.route)
                d = ev.last_detail
                rows.append(f"| {cost} | {prefix} | {r.cost:.3f} | {r.route.shared_prefix_sublayers()} | "
                            f"{d['matchness']:.3f} | {d['confident_share']:.3f} | {d['matchness_when_confident']:.3f} |")
                print(rows[-1], flush=True)
        with open(args.table, "w") as f:
            f.write(f"Route matchness on {folder.name}: {ev.targets.numel()} calibration positions "
                    f"({args.prompts} prompts x {args.max_tokens} tokens), budget {max(8, args.budget // 3)} per cell.\n\n")
            f.write("\n".join(rows) + "\n")
    ev.close()
    return 0


def _intersect(a, b):
    from via_sd_kernels.routes import Route

    if b is None:
        return a
    return Route(a.num_layers, tuple(x and y for x, y in zip(a.attn, b.attn)),
                 tuple(x and y for x, y in zip(a.mlp, b.mlp)), name=a.name)
