"""R1-Zero in miniature: the zero base's pretraining corpus (data/prepare_zero.py), the re-checked solutions in it,
R1-Zero's format and accuracy rewards, the re-check counter, and config/r1zero_tiny.py end to end."""
import filecmp
import json
import os
import random
import re

import pytest

import train_grpo
from data import prepare_zero, tiny_task
from helpers import make_tiny_checkpoint, write_jsonl
from reward import accuracy_reward, format_reward
from tasks import R1_ZERO_TEMPLATE, count_rechecks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _layout(text):
    """A corpus document -> (layout, problem, reply), or ("table", None, text) for a table of single operations."""
    if text.startswith(R1_ZERO_TEMPLATE.split("{")[0]):
        m = re.fullmatch(r"User: What is ([^?\n]+)\?\. Assistant: <think>\n(.+)\n</think> <answer> (-?\d+) </answer>",
                         text[text.index("User: "):], re.S)
        return "template", m.group(1), m.group(2)
    for layout, prefix in prepare_zero.PLAIN_LAYOUTS.items():
        m = re.fullmatch(re.escape(prefix).replace(r"\{q\}", r"What is ([^?\n]+)\?").replace(r"\{e\}", r"([^\n]+)")
                         + "(.+)", text, re.S)
        if m:
            return layout, m.group(1), m.group(2)
    if "\n" not in text:
        return "bare", text.rsplit("=", 1)[0], text.rsplit("=", 1)[1]
    return "table", None, text


def test_corpus_is_seeded_byte_stable_and_shares_no_problem_with_test_or_train(tmp_path):
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    prepare_zero.main([f"--out={a}", "--n=4000", "--tables=400"])
    prepare_zero.main([f"--out={b}", "--n=4000", "--tables=400"])
    assert filecmp.cmp(a, b, shallow=False) and prepare_zero.R1_ZERO == R1_ZERO_TEMPLATE
    prepare_zero.main([f"--out={b}", "--n=4000", "--tables=400", "--seed=7"])
    assert not filecmp.cmp(a, b, shallow=False)
    held_out = set()
    for name in ("test.jsonl", "train.jsonl"):
        held_out |= {json.loads(line)["prompt"][len("What is "):-1] for line in open(os.path.join(ROOT, "data/tiny", name))}
    docs = [_layout(json.loads(line)["text"]) for line in open(a)]
    problems = [p for _, p, _ in docs if p is not None]
    assert len(problems) == 4000 and len(set(problems)) == len(problems) and not set(problems) & held_out
    tables = [t for layout, _, t in docs if layout == "table"]
    assert len(tables) == 400
    for line in (line for t in tables for line in t.split("\n")):  # one operation a line, right, not a problem
        a, op, b, value = re.fullmatch(r"(-?\d+)([-+*])(\d+|\(-\d+\))=(-?\d+)", line).groups()
        assert tiny_task.OPS[op](int(a), int(b.strip("()"))) == int(value)


def test_every_layout_answers_mostly_outright_and_works_a_minority(tmp_path):
    path = str(tmp_path / "a.jsonl")
    prepare_zero.main([f"--out={path}", "--n=4000", "--tables=10"])
    docs = [_layout(json.loads(line)["text"]) for line in open(path)]
    by_layout = {}
    for layout, expr, reply in docs:
        if layout == "table":
            continue
        answer = tiny_task.answer(expr)
        if layout == "bare":
            assert reply == str(answer)
            continue
        # the same sentence ends every reply; worked ones open straight with the first step (no words of their own)
        assert reply.endswith(f"The answer is {answer}.")
        worked = reply != f"The answer is {answer}."
        if worked:
            first = tiny_task.solution_lines(expr)[0]
            assert reply.split("\n")[0].split("=")[0] == first.split("=")[0]
        by_layout.setdefault(layout, []).append(worked)
    assert set(by_layout) == {"template", *prepare_zero.PLAIN_LAYOUTS}
    assert 0.2 < len(by_layout["template"]) / len(docs) < 0.3
    for layout, worked in by_layout.items():
        assert 0.2 < sum(worked) / len(worked) < 0.4, layout  # mostly outright, in every layout
    texts = [json.loads(line)["text"] for line in open(path)]
    for t in texts:
        if t.startswith(R1_ZERO_TEMPLATE.split("{")[0]):
            completion = t.split("Assistant:", 1)[1]
            assert format_reward(completion, "answer_tag") == 1.0 and accuracy_reward(completion, str(
                tiny_task.answer(t.split("What is ", 1)[1].split("?")[0]))) == 1.0
    rechecked = sum(count_rechecks(t) > 0 for t in texts) / sum(w for ws in by_layout.values() for w in ws)
    assert 0.02 < rechecked < 0.08  # a few worked solutions re-check a step


def test_prompt_files_hold_test_problems_in_each_layout(tmp_path):
    prepare_zero.main([f"--prompts={tmp_path}"])
    test = [json.loads(line) for line in open(os.path.join(ROOT, "data/tiny/test.jsonl"))]
    for layout in [*prepare_zero.PLAIN_LAYOUTS, "bare"]:
        rows = [json.loads(line) for line in open(tmp_path / f"test_{layout}.jsonl")]
        assert [r["answer"] for r in rows] == [r["answer"] for r in test]
        for r, t in zip(rows, test):
            expr = t["prompt"][len("What is "):-1]
            if layout == "bare":
                assert r["prompt"] == expr + "="
            else:  # the prompt is the layout up to where the reply starts
                assert _layout(r["prompt"] + "The answer is 0.")[:2] == (layout, expr)


def test_recheck_lines_make_a_slip_and_fix_it():
    rng = random.Random(0)
    for _ in range(200):
        expr = tiny_task.generate(rng)
        right, lines = tiny_task.solution_lines(expr), tiny_task.recheck_lines(expr, rng)
        k = next(i for i, line in enumerate(lines) if line.startswith("Wait, "))
        assert lines[:k - 1] == right[:k - 1] and lines[k] == "Wait, " + right[k - 1] and lines[k + 1:] == right[k:]
        slip, fix = lines[k - 1], right[k - 1]
        assert slip.split("=")[0] == fix.split("=")[0] and slip.split("=")[1] != fix.split("=")[1].split(",")[0]


def test_r1zero_format_and_accuracy_rewards():
    good = " <think> 8*3=24, so 7+24\n7+24=31 </think> <answer> 31 </answer>"
    assert format_reward(good, "answer_tag") == 1.0 and accuracy_reward(good, "31") == 1.0
    for bad in (" <think> </think> <answer> 31 </answer>",  # empty reasoning
                " <think> 7+24=31 </think> <answer> </answer>",  # empty answer
                " <think> 7+24=31 </think> 31",  # no answer tags
                " 7+24=31 <answer> 31 </answer>",  # no think block
                " <think> a </think> <answer> 31 </answer> more",  # text after the answer
                " <think> a </think> <think> b </think> <answer> 31 </answer>"):  # two think blocks
        assert format_reward(bad, "answer_tag") == 0.0, bad
    # the answer is read inside <answer>, not from the reasoning
    assert accuracy_reward(" <think> 7+24=30 </think> <answer> 31 </answer>", "31") == 1.0
    assert accuracy_reward(" <think> 7+24=31 </think> <answer> 30 </answer>", "31") == 0.0


@pytest.mark.parametrize("text, n", [
    ("8*3=24, so 7+24\n7+24=31", 0),
    ("8*3=21\nWait, 8*3=24, so 7+24\n7+24=31", 1),  # the tiny world's slip and fix
    ("<think> 8*3=21\nWait, 8*3=24\n7+24=32\nwait, 7+24=31 </think>", 2),
    ("<think>Wait, wait. Wait. That's an aha moment I can flag here.", 1),  # R1-Zero's (one line)
    ("Let me check: 24+7 is 31.\nHmm, right.\nRe-check the sum.\nDouble-check done.", 4),
    ("I will wait for it.\nThe awaited answer is 3.\nA check mark: 7", 0),  # not at a line's start
])
def test_count_rechecks_matches_hand_labels(text, n):
    assert count_rechecks(text) == n


def test_recipe_runs_two_steps_on_a_tiny_random_model(tmp_path):
    ckpt = make_tiny_checkpoint(str(tmp_path / "ckpt"), std=0.1)
    rows = [{"prompt": f"What is {a}+{b}?", "answer": str(a + b)} for a in range(5) for b in range(5)]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = train_grpo.configure([os.path.join(ROOT, "config/r1zero_tiny.py")])
    assert cfg.prompt_template == "r1zero" and cfg.beta == 0 and "format_answer" in cfg.rewards
    out = str(tmp_path / "out")
    res = train_grpo.main([os.path.join(ROOT, "config/r1zero_tiny.py"), f"--init_from={ckpt}", f"--data={data}",
                           f"--eval_data={data}", "--eval_n=8", "--max_steps=2", "--eval_every=1", "--group_size=4",
                           "--prompts_per_step=4", "--max_completion_len=16", f"--out_dir={out}", "--progress=0",
                           "--max_prompt_len=4096"])
    assert res["step"] == 2 and "before" in res
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert metrics[0]["step"] == 0 and "eval_format" in metrics[0]  # the evaluation before the first step
    assert all("reward/format_answer" in m and "recheck_frac" in m for m in metrics[1:])
    assert all(k in metrics[-1] for k in ("eval_accuracy", "eval_completion_len", "eval_format", "eval_recheck_frac"))
