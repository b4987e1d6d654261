"""Check the Triton kernels against the torch reference on a GPU, and time both.

    python benchmarks/gpu_check.py [--batches 1,4,16,64,256] [--vocabs 49152,131072] [--gamma 5]
                                   [--iters 20] [--out benchmarks/results/gpu_check.json]

For every vocabulary size and batch size it builds one random batch of drafts (every sequence
proposes γ tokens; drafts agree with the verifiers often enough that scans go deep and every tier
occurs), runs the gate, binary verification (greedy and sampling) and three-tier verification
(sampling) with backend="torch" and backend="triton", requires identical results, and reports the
median time of each (CUDA events). It prints a table, writes the JSON, and exits 1 if any result
differs. Without a GPU it says so and exits 0.

`--device cpu` with TRITON_INTERPRET=1 runs the same comparison through Triton's interpreter, a
smoke test of this script on a machine without a GPU (keep the vocabulary small).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from via_sd_kernels import SpecMetadata, gate, verify_binary, verify_three_tier  # noqa: E402


def make_inputs(batch: int, gamma: int, vocab: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    t = batch * gamma
    rows = t + batch
    draft_probs = torch.softmax(torch.randn(t, vocab, device=device, generator=g) * 2, -1)
    drafts = torch.multinomial(draft_probs, 1, generator=g).squeeze(1)
    meta = SpecMetadata.from_tensors(drafts, torch.full((batch,), gamma, device=device), gamma)

    def verifier() -> torch.Tensor:
        logits = torch.randn(rows, vocab, device=device, generator=g) * 2
        bump = (torch.rand(t, device=device, generator=g) < 0.8).float() * 12.0
        logits[meta.token_rows, drafts] += bump  # the draft is usually the clear favourite
        return torch.softmax(logits, -1)

    slim, full = verifier(), verifier()
    return {
        "meta": meta,
        "slim": slim,
        "full": full,
        "draft_probs": draft_probs,
        "uniforms": torch.rand(t, device=device, generator=g),
        "noise": torch.empty(rows, vocab, device=device).exponential_(generator=g),
        "accept": torch.full((batch,), 0.7, device=device),
        "escalate": torch.full((batch,), 0.5, device=device),
        "bonus": torch.full((batch,), 0.9, device=device),
    }


def ops(x: dict) -> dict:
    """name -> fn(backend) for every checked operation."""
    meta = x["meta"]
    gate_out = gate(x["slim"], meta, x["accept"], x["escalate"], x["bonus"], backend="torch")
    return {
        "gate": lambda be: gate(x["slim"], meta, x["accept"], x["escalate"], x["bonus"], backend=be),
        "binary_greedy": lambda be: verify_binary(meta, x["full"], None, None, None, backend=be),
        "binary_sampling": lambda be: verify_binary(
            meta, x["full"], x["draft_probs"], x["uniforms"], x["noise"], backend=be
        ),
        "three_tier_sampling": lambda be: verify_three_tier(
            meta, gate_out, x["slim"], x["full"], x["draft_probs"], x["uniforms"], x["noise"], backend=be
        ),
    }


def same(a, b) -> bool:
    """Field by field equality of two result dataclasses (dtypes included)."""
    for f in dataclasses.fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(va):
            if not same(va, vb):
                return False
        elif va.dtype != vb.dtype or not torch.equal(va, vb):
            return False
    return True


def time_ms(fn, device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--vocabs", default="49152,131072")
    ap.add_argument("--gamma", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (the CPU tests cover the kernels "
              "under TRITON_INTERPRET=1).")
        return 0
    try:
        import triton
    except ImportError:
        print("gpu_check: triton is not installed; install it to check the kernels.")
        return 0

    rows, mismatches = [], 0
    header = f"{'vocab':>7} {'batch':>5} {'op':<20} {'torch ms':>9} {'triton ms':>9} {'speedup':>7}  same"
    print(header)
    print("-" * len(header))
    for vocab in [int(v) for v in args.vocabs.split(",")]:
        for batch in [int(b) for b in args.batches.split(",")]:
            x = make_inputs(batch, args.gamma, vocab, device)
            for name, fn in ops(x).items():
                ok = same(fn("torch"), fn("triton"))
                mismatches += not ok
                t_torch = time_ms(lambda: fn("torch"), device, args.warmup, args.iters)
                t_triton = time_ms(lambda: fn("triton"), device, args.warmup, args.iters)
                row = {
                    "vocab": vocab,
                    "batch": batch,
                    "gamma": args.gamma,
                    "op": name,
                    "torch_ms": round(t_torch, 4),
                    "triton_ms": round(t_triton, 4),
                    "speedup": round(t_torch / t_triton, 2) if t_triton > 0 else None,
                    "identical": ok,
                }
                rows.append(row)
                print(
                    f"{vocab:>7} {batch:>5} {name:<20} {t_torch:>9.3f} {t_triton:>9.3f} "
                    f"{row['speedup']:>7} {'yes' if ok else 'NO'}"
                )
            del x
            if device.type == "cuda":
                torch.cuda.empty_cache()

    result = {
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "rows": rows,
        "mismatches": mismatches,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{len(rows)} checks, {mismatches} mismatches; wrote {out}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
