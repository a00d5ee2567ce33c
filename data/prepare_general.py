"""Convert a public general-chat dataset (JSONL with `messages`) into R1 stage 3's non-reasoning SFT set.

R1 adds ~200k non-reasoning samples (writing, factual QA, translation, ...) to the rejection-sampled reasoning
data before its stage-3 SFT. Any chat set exported to JSONL works as the source (e.g. an ultrachat or tulu SFT
split saved with `datasets`' to_json); this script makes it safe to mix in:

    python data/prepare_general.py --src=ultrachat_train.jsonl --out=data/general.jsonl --n=200000 \\
        --tokenizer=/models/Qwen2.5-1.5B --max_tokens=4096
    python train_sft.py --data=out/reject/train.jsonl:0.75,data/general.jsonl:0.25 ...

Per row: `messages` (or ShareGPT's `conversations` with from/value) is normalised to role/content with roles
system/user/assistant; it must end with a non-empty assistant turn, and it is dropped (and counted) when a turn is
empty, when it carries a <think> block (that is reasoning data, which stage 3 takes from rejection sampling), when
the first user turn repeats an earlier row's (exact duplicates after whitespace folding), or when its chat-templated
length exceeds --max_tokens (with --tokenizer). Rows that are not JSON objects or have no conversation at all stop
the run with file:line (or are skipped with --skip_bad_rows=1). Then --n rows are drawn at random (seeded) and
written as {"messages", "source"} with the source file and line. A summary of what was dropped is printed.
"""

import argparse
import os
import random
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

from data.jsonl import iter_jsonl, write_jsonl

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "bot": "assistant"}


def normalise(row, where):
    """A row's conversation as [{"role", "content"}] with roles system/user/assistant. Raises ValueError naming
    `where` when the row has no conversation or a turn is not a role/content (or from/value) object."""
    turns = row.get("messages", row.get("conversations"))
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: expected a non-empty 'messages' (or 'conversations') list")
    out = []
    for k, t in enumerate(turns):
        if not isinstance(t, dict):
            raise ValueError(f"{where}: turn {k} is a {type(t).__name__}, expected an object")
        role, content = t.get("role", t.get("from")), t.get("content", t.get("value"))
        if role not in ROLES or not isinstance(content, str):
            raise ValueError(f"{where}: turn {k} needs a role in {sorted(ROLES)} and a string content, got "
                             f"role={role!r}")
        out.append({"role": ROLES[role], "content": content})
    return out


def drop_reason(messages, seen, tok=None, max_tokens=0):
    """Why this conversation stays out of the general set (None: keep it); adds its first user turn to `seen`."""
    if messages[-1]["role"] != "assistant":
        return "no_final_answer"
    if any(not m["content"].strip() for m in messages):
        return "empty_turn"
    if any("<think>" in m["content"] for m in messages if m["role"] == "assistant"):
        return "reasoning"
    first = next((m["content"] for m in messages if m["role"] == "user"), None)
    if first is None:
        return "no_user_turn"
    key = " ".join(first.split()).lower()
    if key in seen:
        return "duplicate"
    if tok is not None and max_tokens and len(tok.apply_chat_template(messages, add_generation_prompt=False)) > max_tokens:
        return "too_long"
    seen.add(key)
    return None


def convert(paths, n=0, seed=1337, tok=None, max_tokens=0, skip_bad_rows=False):
    """-> (rows {"messages", "source"}, Counter of drop reasons). n > 0: a seeded random n of the kept rows."""
    kept, dropped, seen = [], Counter(), set()
    for path in paths:
        for lineno, row in iter_jsonl(path, skip_bad_rows):
            where = f"{path}:{lineno}"
            try:
                messages = normalise(row, where)
            except ValueError:
                if not skip_bad_rows:
                    raise
                dropped["bad_row"] += 1
                continue
            reason = drop_reason(messages, seen, tok, max_tokens)
            if reason:
                dropped[reason] += 1
            else:
                kept.append({"messages": messages, "source": where})
    if n and n < len(kept):
        chosen = sorted(random.Random(seed).sample(range(len(kept)), n))  # in file order
        kept = [kept[i] for i in chosen]
    return kept, dropped


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="input JSONL file(s), comma-separated")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=0, help="rows to keep (a seeded random choice); 0: all")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--tokenizer", default="", help="checkpoint/tokenizer dir, for the --max_tokens check")
    p.add_argument("--max_tokens", type=int, default=0, help="drop conversations longer than this (chat-templated)")
    p.add_argument("--skip_bad_rows", type=int, default=0)
    args = p.parse_args(argv)
    tok = None
    if args.max_tokens:
        if not args.tokenizer:
            p.error("--max_tokens needs --tokenizer=DIR")
        from tokenizer import Tokenizer
        tok = Tokenizer.from_pretrained(args.tokenizer)
    try:
        rows, dropped = convert(args.src.split(","), args.n, args.seed, tok, args.max_tokens, bool(args.skip_bad_rows))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    write_jsonl(args.out, rows)
    why = ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "none"
    print(f"wrote {len(rows)} rows to {args.out}; dropped: {why}")


if __name__ == "__main__":
    main()
