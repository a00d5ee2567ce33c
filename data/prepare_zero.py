"""The R1-Zero base's pretraining corpus: what a small base model has read before pure RL (config/r1zero_tiny.py).

Real bases have read plenty of question-and-answer text, much of it in shapes like R1-Zero's template, usually with
the answer given outright and the working left out; R1-Zero's RL amplifies the working they have also seen. This
corpus gives the tiny base the same kind of reading:
  - plain-text worked solutions of the tiny task, as in data/tiny/pretrain.jsonl (tiny_task.pretrain_text);
  - a share of "web" text in the R1-Zero template's shape (the template with the question, then the answer):
    mostly (three of five) the answer given outright, `<think> 7+8*3-5=26 </think> <answer> 26 </answer>`, and
    otherwise after a little working inside the think tags, one operation per line;
  - in both kinds, a few worked solutions that get a step wrong, re-check it and fix it ("Wait, 8*3=24, ..."), the
    way people do when they write things out (tiny_task.recheck_lines).
No problem of data/tiny/test.jsonl or data/tiny/train.jsonl appears (the RL prompts and the held-out set).

    python data/prepare_zero.py         # -> data/tiny/zero_pretrain.jsonl (seeded, byte-stable, a few seconds)
"""
import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

from data import tiny_task
from data.jsonl import write_jsonl

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny")
# R1-Zero's template (DeepSeek-R1, arXiv 2501.12948, Table 1), as tasks.R1_ZERO_TEMPLATE renders it
R1_ZERO = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
           "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
           "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
           "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
           "User: {prompt}. Assistant:")


def zero_text(expr, rng, worked_frac, recheck_frac):
    """One question in the R1-Zero template and its answer: outright, or after working (sometimes re-checked)."""
    if rng.random() < worked_frac:
        steps = tiny_task.recheck_lines(expr, rng) if rng.random() < recheck_frac else tiny_task.solution_lines(expr)
        think = "\n".join(steps)
    else:
        think = f"{expr}={tiny_task.answer(expr)}"
    return R1_ZERO.format(prompt=tiny_task.question(expr)) + f" <think> {think} </think> <answer> " \
        f"{tiny_task.answer(expr)} </answer>"


def plain_text(expr, rng, recheck_frac):
    """A plain-text worked solution (or bare fact) of pretrain.jsonl's kind, sometimes with a re-checked step."""
    text = tiny_task.pretrain_text(expr, rng)
    if "\n" in text and rng.random() < recheck_frac:
        steps = tiny_task.solution_lines(expr)
        text = text.replace("\n".join(steps), "\n".join(tiny_task.recheck_lines(expr, rng)))
    return text


def corpus(n, seed, held_out, template_frac, worked_frac, recheck_frac):
    """n documents {"text"} about n distinct problems, none of them in held_out."""
    rng, seen, rows = random.Random(f"{seed}:zero"), set(held_out), []
    while len(rows) < n:
        expr = tiny_task.generate(rng)
        if expr in seen:
            continue
        seen.add(expr)
        text = zero_text(expr, rng, worked_frac, recheck_frac) if rng.random() < template_frac \
            else plain_text(expr, rng, recheck_frac)
        rows.append({"text": text})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(TINY, "zero_pretrain.jsonl"))
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--n", type=int, default=40000, help="documents, one problem each")
    p.add_argument("--template_frac", type=float, default=0.3, help="share of text in the R1-Zero template's shape")
    # 0.2 gave a base whose RL run reached 37.2% (its best plain prompt: 48.2%), 0.4 one that reaches 44.6% (46.6%)
    p.add_argument("--worked_frac", type=float, default=0.4, help="template text: share answered after working")
    p.add_argument("--recheck_frac", type=float, default=0.05, help="worked solutions that re-check a step")
    args = p.parse_args(argv)
    held_out = set()
    for name in ("test.jsonl", "train.jsonl"):
        with open(os.path.join(TINY, name), encoding="utf-8") as f:
            held_out |= {json.loads(line)["prompt"][len("What is "):-1] for line in f}
    rows = corpus(args.n, args.seed, held_out, args.template_frac, args.worked_frac, args.recheck_frac)
    write_jsonl(args.out, rows)
    print(f"wrote {len(rows)} documents to {args.out}")


if __name__ == "__main__":
    main()
