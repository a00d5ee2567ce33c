"""Long-CoT SFT data -> the R1 cold-start format.

    python data/prepare_coldstart.py --src=stratos.jsonl --out=data/coldstart.jsonl

Output rows: {"messages": [{"role": "user", "content": question},
                           {"role": "assistant", "content": "<think>\\n{cot}\\n</think>\\n\\n{solution}"}]}
Accepted input rows (JSONL; export parquet datasets to JSONL first):
  * Bespoke-Stratos / OpenThoughts style: {"conversations": [{"from": "user", "value": ...},
    {"from": "assistant", "value": "<|begin_of_thought|>...<|end_of_thought|><|begin_of_solution|>...<|end_of_solution|>"}]}
    ("from"/"value" or "role"/"content"; "human"/"gpt" roles too; a "messages" list works the same);
  * an assistant text that already has "<think>...</think> solution";
  * separate fields: question in problem/question/prompt, CoT in reasoning/thinking/deepseek_reasoning/
    reasoning_content, answer text in response/deepseek_solution.
R1's readability rules, where cheap (dropped rows are counted, not errors): empty CoT or solution,
CoT that mixes scripts (e.g. Latin question, CoT partly CJK), code blocks in the CoT (--drop_code=1),
CoT longer than --max_chars. A row whose shape is not understood is an error naming file:line
(or a counted skip with --skip_bad_rows=1).
"""

import argparse
import os
import re
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

from data.jsonl import convert_jsonl, write_jsonl

QUESTION_KEYS = ("problem", "question", "prompt")
REASONING_KEYS = ("reasoning", "thinking", "deepseek_reasoning", "reasoning_content")
RESPONSE_KEYS = ("response", "deepseek_solution")
USER_ROLES, ASSISTANT_ROLES = {"user", "human"}, {"assistant", "gpt"}
_STRATOS = re.compile(r"<\|begin_of_thought\|>(.*?)<\|end_of_thought\|>\s*"
                      r"<\|begin_of_solution\|>(.*?)(?:<\|end_of_solution\|>|$)", re.S)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
_LATIN = re.compile(r"[A-Za-z]")


def split_cot(text):
    """An assistant text -> (cot, solution), from either marker style; ValueError if neither is there."""
    m = _STRATOS.search(text)
    if m:
        return m.group(1).strip(), m.group(2).strip()
    if "</think>" in text:
        cot, solution = text.split("</think>", 1)
        return cot.replace("<think>", "", 1).strip(), solution.strip()
    raise ValueError("assistant text has neither <|begin_of_thought|>...<|begin_of_solution|> nor <think>...</think>")


def _turns(row):
    for key in ("conversations", "messages"):
        if isinstance(row.get(key), list):
            turns = [(t.get("from", t.get("role")), t.get("value", t.get("content"))) for t in row[key] if isinstance(t, dict)]
            user = next((c for r, c in turns if r in USER_ROLES), None)
            assistant = next((c for r, c in turns if r in ASSISTANT_ROLES), None)
            if not isinstance(user, str) or not isinstance(assistant, str):
                raise ValueError(f"{key!r} needs a user and an assistant turn with string content")
            return user, assistant
    return None


def parse_row(row):
    """Any accepted input row -> (question, cot, solution)."""
    turns = _turns(row)
    if turns:
        question, assistant = turns
        return (question.strip(), *split_cot(assistant))
    question = next((row[k] for k in QUESTION_KEYS if isinstance(row.get(k), str)), None)
    if question is None:
        raise ValueError(f"no 'conversations'/'messages' list and no question field ({'/'.join(QUESTION_KEYS)})")
    reasoning = next((row[k] for k in REASONING_KEYS if isinstance(row.get(k), str)), None)
    response = next((row[k] for k in RESPONSE_KEYS if isinstance(row.get(k), str)), None)
    if reasoning is not None and response is not None:
        return question.strip(), reasoning.strip(), response.strip()
    if response is not None:  # the response may carry its own <think> block
        return (question.strip(), *split_cot(response))
    raise ValueError(f"no reasoning ({'/'.join(REASONING_KEYS)}) and response ({'/'.join(RESPONSE_KEYS)}) fields")


def rejection_reason(question, cot, solution, max_chars=0, drop_code=False):
    """Why R1's readability rules would drop this sample, or None to keep it."""
    if not cot:
        return "empty_cot"
    if not solution:
        return "empty_solution"
    if max_chars and len(cot) > max_chars:
        return "too_long"
    if drop_code and "```" in cot:
        return "code_in_cot"
    # Language mixing: a question in Latin script whose CoT is partly CJK (or the other way round).
    cjk, latin = len(_CJK.findall(cot)), len(_LATIN.findall(cot))
    cjk_share = cjk / max(1, cjk + latin)
    question_is_cjk = len(_CJK.findall(question)) > len(_LATIN.findall(question))
    if (cjk_share > 0.05 and not question_is_cjk) or (cjk_share < 0.2 and question_is_cjk):
        return "mixed_language"
    return None


def to_r1(question, cot, solution):
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": f"<think>\n{cot}\n</think>\n\n{solution}"}]}


def convert_coldstart_row(row, max_chars=0, drop_code=False, dropped=None):
    """One input row -> an R1-format row, or None when a readability rule drops it (counted in `dropped`)."""
    question, cot, solution = parse_row(row)
    if not question:
        raise ValueError("empty question")
    reason = rejection_reason(question, cot, solution, max_chars, drop_code)
    if reason:
        if dropped is not None:
            dropped[reason] += 1
        return None
    return to_r1(question, cot, solution)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, nargs="+", help="one or more long-CoT JSONL files")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "coldstart.jsonl"))
    p.add_argument("--max_chars", type=int, default=0, help="drop rows whose CoT is longer (0: keep all)")
    p.add_argument("--drop_code", type=int, default=0, help="1: drop rows with ``` code blocks in the CoT")
    p.add_argument("--skip_bad_rows", type=int, default=0, help="1: skip (and count) malformed rows instead of failing")
    args = p.parse_args(argv)

    rows, dropped = [], Counter()
    for src in args.src:
        if not os.path.isfile(src):
            sys.exit(f"error: --src file not found: {src}")
        rows += convert_jsonl(src, lambda r: convert_coldstart_row(r, args.max_chars, bool(args.drop_code), dropped),
                              bool(args.skip_bad_rows))
    write_jsonl(args.out, rows)
    print(f"{len(rows)} rows -> {args.out}" + (f"; dropped {dict(dropped)}" if dropped else ""))


if __name__ == "__main__":
    main()
