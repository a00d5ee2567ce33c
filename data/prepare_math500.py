"""MATH-500 (the 500-problem MATH test subset from "Let's Verify Step by Step") -> nanoR1 JSONL.

    python data/prepare_math500.py                       # download -> data/math500/test.jsonl
    python data/prepare_math500.py --src=test.jsonl      # offline: convert a file you placed yourself
    python data/prepare_math500.py --sft=1               # also write test_sft.jsonl (R1 format)

Source: HuggingFaceH4/MATH-500 test.jsonl; rows {"problem", "solution", "answer", "subject", "level",
"unique_id"}. The gold "answer" is a LaTeX string ("\\frac{14}{3}", "(3, \\frac{\\pi}{2})"), kept as is:
comparing it with a model's last \\boxed{} is the reward's job, not this script's.
Output rows: {"prompt": problem, "messages": [{"role": "user", "content": problem + instruction}],
"answer", "solution", "subject", "level", "unique_id"}.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

from data.jsonl import convert_jsonl, download, write_jsonl
from data.prepare_gsm8k import to_sft  # same R1 form: solution as the thinking, boxed answer

URL = "https://huggingface.co/datasets/HuggingFaceH4/MATH-500/resolve/main/test.jsonl"
INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def convert_math500_row(row, instruction=INSTRUCTION):
    """{"problem", "solution", "answer", ...} -> {"prompt", "messages", "answer", "solution", ...}."""
    problem, answer = row["problem"], row["answer"]
    for name, value in (("problem", problem), ("answer", answer)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"empty or non-string {name!r}")
    problem = problem.strip()
    out = {"prompt": problem, "messages": [{"role": "user", "content": problem + instruction}],
           "answer": answer.strip(), "solution": str(row.get("solution", "")).strip()}
    for key in ("subject", "level", "unique_id"):
        if key in row:
            out[key] = row[key]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "math500"), help="output folder")
    p.add_argument("--src", default=None, help="a local MATH-500 test.jsonl instead of downloading")
    p.add_argument("--instruction", default=INSTRUCTION, help="appended to the problem in messages")
    p.add_argument("--sft", type=int, default=0, help="1: also write test_sft.jsonl in the R1 format")
    p.add_argument("--skip_bad_rows", type=int, default=0, help="1: skip (and count) malformed rows instead of failing")
    args = p.parse_args(argv)

    src = args.src or download(URL, os.path.join(args.out, "raw", "test.jsonl"))
    rows = convert_jsonl(src, lambda r: convert_math500_row(r, args.instruction), bool(args.skip_bad_rows))
    write_jsonl(os.path.join(args.out, "test.jsonl"), rows)
    print(f"test: {len(rows)} rows -> {os.path.join(args.out, 'test.jsonl')}")
    if args.sft:
        write_jsonl(os.path.join(args.out, "test_sft.jsonl"), [to_sft(r) for r in rows])


if __name__ == "__main__":
    main()
