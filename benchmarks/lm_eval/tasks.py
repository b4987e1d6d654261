"""Two small lm-eval-harness tasks for scoring a running via-sd server, written as task files:

    python benchmarks/lm_eval/tasks.py --out /tmp/via-sd-tasks
    lm_eval --model local-completions --tasks via_sd_choices,via_sd_math --include_path /tmp/via-sd-tasks \\
        --model_args model=SmolLM2-135M-Instruct,base_url=http://127.0.0.1:8000/v1/completions,tokenizer=MODEL_DIR,num_concurrent=1,batch_size=4

- `via_sd_choices` (loglikelihood: echo + prompt logprobs): 20 everyday multiple-choice questions
  written for this check (`everyday_choices.jsonl`); accuracy by the choices' loglikelihoods.
- `via_sd_math` (generate_until, greedy): Spec-Bench's math_reasoning questions (`--limit-math`
  of them), the final number of the answer against the reference's `#### N`.

lm-eval-harness is not a dependency of the project: install it where you run it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPEC_BENCH = HERE.parents[1].parent / "shared" / "data" / "spec_bench" / "question.jsonl"

CHOICES = """task: via_sd_choices
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

MATH = """task: via_sd_math
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer: Let's think step by step."
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["Question:", "<|im_end|>", "<|endoftext|>"]
  max_gen_toks: {max_tokens}
  do_sample: false
  temperature: 0
filter_list:
  - name: last-number
    filter:
      - function: regex
        regex_pattern: "(-?[0-9][0-9,]*(?:\\\\.[0-9]+)?)"
        group_select: -1
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
    regexes_to_ignore: [",", "\\\\$"]
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the task files (lm_eval --include_path)")
    ap.add_argument("--spec-bench", default=str(SPEC_BENCH))
    ap.add_argument("--limit-math", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=192)
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "via_sd_choices.yaml").write_text(CHOICES.format(data=HERE / "everyday_choices.jsonl"))
    math = out / "via_sd_math.jsonl"
    with open(args.spec_bench) as f, open(math, "w") as w:
        qs = [json.loads(line) for line in f]
        qs = [q for q in qs if q["category"] == "math_reasoning"][: args.limit_math]
        for q in qs:
            answer = q["reference"][0].split("####")[-1].strip().replace(",", "")
            w.write(json.dumps({"question": q["turns"][0], "answer": answer}) + "\n")
    (out / "via_sd_math.yaml").write_text(MATH.format(data=math, max_tokens=args.max_tokens))
    print(f"wrote via_sd_choices and via_sd_math ({len(qs)} questions) to {out}")


if __name__ == "__main__":
    main()
