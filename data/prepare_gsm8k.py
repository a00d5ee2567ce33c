"""GSM8K (grade-school math word problems) -> nanoR1 JSONL.

    python data/prepare_gsm8k.py                         # download train+test -> data/gsm8k/{train,test}.jsonl
    python data/prepare_gsm8k.py --split=test --src=test.jsonl   # offline: convert a file you placed yourself
    python data/prepare_gsm8k.py --sft=1                 # also write {split}_sft.jsonl (R1 format)

Source: the openai/grade-school-math GitHub repo; rows {"question", "answer"} where "answer" is the
worked solution with calculator notes `<<48/2=24>>` and a last line `#### 72`.
Output rows: {"prompt": question, "messages": [{"role": "user", "content": question + instruction}],
"answer": "72", "solution": worked steps without calculator notes}. The default instruction is the
one DeepSeek-R1 recommends for math ("...put your final answer within \\boxed{}"), since the reward
reads the last \\boxed{}; pass --instruction="" for the bare question.
The SFT form: assistant = "<think>\\n{solution}\\n</think>\\n\\boxed{72}".
"""

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

from data.jsonl import convert_jsonl, download, write_jsonl

URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{split}.jsonl"
INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
_CALCULATOR = re.compile(r"<<[^>]*>>")


def convert_gsm8k_row(row, instruction=INSTRUCTION):
    """{"question", "answer": "...#### 72"} -> {"prompt", "messages", "answer", "solution"}."""
    question, worked = row["question"], row["answer"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError("empty 'question'")
    if not isinstance(worked, str) or "####" not in worked:
        raise ValueError("'answer' has no '#### <number>' final line")
    solution, final = worked.rsplit("####", 1)
    final = final.strip().replace(",", "")  # "1,000" -> "1000"
    if not re.fullmatch(r"-?\d+(\.\d+)?", final):
        raise ValueError(f"final answer after '####' is not a number: {final!r}")
    question = question.strip()
    return {"prompt": question, "messages": [{"role": "user", "content": question + instruction}],
            "answer": final, "solution": _CALCULATOR.sub("", solution).strip()}


def to_sft(row):
    """R1 format: the worked solution as the thinking, then the boxed answer."""
    content = f"<think>\n{row['solution']}\n</think>\n\\boxed{{{row['answer']}}}"
    return {"messages": row["messages"] + [{"role": "assistant", "content": content}]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "gsm8k"), help="output folder")
    p.add_argument("--split", choices=["train", "test", "both"], default="both")
    p.add_argument("--src", default=None, help="a local GSM8K JSONL file instead of downloading (one --split only)")
    p.add_argument("--instruction", default=INSTRUCTION, help="appended to the question in messages")
    p.add_argument("--sft", type=int, default=0, help="1: also write {split}_sft.jsonl in the R1 format")
    p.add_argument("--skip_bad_rows", type=int, default=0, help="1: skip (and count) malformed rows instead of failing")
    args = p.parse_args(argv)
    splits = ["train", "test"] if args.split == "both" else [args.split]
    if args.src and len(splits) != 1:
        p.error("--src converts one file: also pass --split=train or --split=test")

    for split in splits:
        src = args.src or download(URL.format(split=split), os.path.join(args.out, "raw", f"{split}.jsonl"),
                                    hint=f"--split={split} --src=FILE")
        rows = convert_jsonl(src, lambda r: convert_gsm8k_row(r, args.instruction), bool(args.skip_bad_rows))
        write_jsonl(os.path.join(args.out, f"{split}.jsonl"), rows)
        print(f"{split}: {len(rows)} rows -> {os.path.join(args.out, split + '.jsonl')}")
        if args.sft:
            write_jsonl(os.path.join(args.out, f"{split}_sft.jsonl"), [to_sft(r) for r in rows])


if __name__ == "__main__":
    main()
