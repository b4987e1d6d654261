"""llama.cpp's prompt and decode speed alone on the bundled GGUF (llama-cpp-python, `make
llamacpp-install`): one 311-token chat prompt, then 128 greedy tokens, twice.

    python benchmarks/llamacpp_alone.py [--gguf FILE] [--threads 2]

Prints per run the time to the first token, the prompt's tokens/s and decoding's tokens/s (the
tokens after the first, over the time after it): the split `via-sd bench`'s llamacpp row, which
counts both, does not show.
"""

from __future__ import annotations

import argparse
import time

from llama_cpp import Llama

from server.engine.model_files import bundled_gguf_path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=None, help="default: the bundled model's")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    llm = Llama(model_path=str(args.gguf or bundled_gguf_path()), n_ctx=2048, n_batch=512, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)
    text = "<|im_start|>user\n" + "Summarize this text. " * 60 + "<|im_end|>\n<|im_start|>assistant\n"
    ids = llm.tokenize(text.encode(), special=True)
    print(f"prompt: {len(ids)} tokens, {args.threads} threads")
    for _ in range(2):
        llm.reset()
        t = time.perf_counter()
        first, n = None, 0
        for _tok in llm.generate(ids, temp=0.0):
            if first is None:
                first = time.perf_counter() - t
            n += 1
            if n >= args.max_tokens:
                break
        dt = time.perf_counter() - t
        print(f"TTFT {first:.3f} s, prompt {len(ids) / first:.0f} tokens/s, decode {(n - 1) / (dt - first):.1f} tokens/s")


if __name__ == "__main__":
    main()
