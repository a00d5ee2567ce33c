"""The cold start of tool use in miniature: SFT conversations for data/tiny/tool_start (config/tools_tiny.py's start).

A minority of the traces (--tool_frac) hand the whole expression to the calculator tool and box what it returns:

    user: What is 12-6*11-3?
    assistant: <tool_call>\\n{"name": "calculator", "arguments": {"expression": "12-6*11-3"}}\\n</tool_call>
    tool: -57
    assistant: \\boxed{-57}

The rest work in their head, in the R1 cold-start format of data/tiny/coldstart_mixed.jsonl: one operation a line
(careful) or, in --shortcut_frac of them, the result stated outright, which the tiny model cannot compute in one go.
The calls are in Qwen's chat format, rendered by the chat template (tokenizer.py) with no tool schemas in the system
turn: the tiny model learns its one tool here, and config/tools_tiny.py prompts it the same way (tools_in_prompt = 0).
No problem of data/tiny/test.jsonl or data/tiny/train.jsonl appears.

    python data/prepare_tools.py --out=out/tools_coldstart.jsonl      # 12,000 conversations, seeded, ~1 s
"""
import argparse
import itertools
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

from data import tiny_task
from data.jsonl import write_jsonl

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny")


def tool_messages(expr):
    """The conversation of a trace that calls the calculator on the whole expression."""
    value = str(tiny_task.answer(expr))
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expr}}}
    return [{"role": "user", "content": tiny_task.question(expr)},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": value},
            {"role": "assistant", "content": "\\boxed{" + value + "}"}]


def head_messages(expr, shortcut):
    """The conversation of a trace that works in its head: careful, or the result stated outright (shortcut)."""
    return [{"role": "user", "content": tiny_task.question(expr)},
            {"role": "assistant", "content": tiny_task.r1_completion(expr, shortcut)}]


def conversations(n, seed, held_out, tool_frac, shortcut_frac):
    """n conversations {"messages"} about n distinct problems, none of them in held_out."""
    rng, rows = random.Random(f"{seed}:tools"), []
    for expr in itertools.islice(tiny_task.fresh_problems(rng, set(held_out)), n):
        tool = rng.random() < tool_frac
        rows.append({"messages": tool_messages(expr) if tool else head_messages(expr, rng.random() < shortcut_frac)})
    return rows


def held_out_problems():
    """The expressions of test.jsonl (evaluation) and train.jsonl (the RL prompts)."""
    return tiny_task.problems_in([os.path.join(TINY, "test.jsonl"), os.path.join(TINY, "train.jsonl")])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("out", "tools_coldstart.jsonl"))
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--n", type=int, default=12000, help="conversations, one problem each")
    p.add_argument("--tool_frac", type=float, default=0.2, help="share of the traces that call the calculator")
    p.add_argument("--shortcut_frac", type=float, default=0.5, help="of the others: the result stated outright")
    args = p.parse_args(argv)
    rows = conversations(args.n, args.seed, held_out_problems(), args.tool_frac, args.shortcut_frac)
    write_jsonl(args.out, rows)
    print(f"wrote {len(rows)} conversations to {args.out}")


if __name__ == "__main__":
    main()
