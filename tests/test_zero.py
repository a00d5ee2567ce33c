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


def test_corpus_is_seeded_byte_stable_and_shares_no_problem_with_test_or_train(tmp_path):
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    prepare_zero.main([f"--out={a}", "--n=3000"])
    prepare_zero.main([f"--out={b}", "--n=3000"])
    assert filecmp.cmp(a, b, shallow=False)
    prepare_zero.main([f"--out={b}", "--n=3000", "--seed=7"])
    assert not filecmp.cmp(a, b, shallow=False)
    held_out = set()
    for name in ("test.jsonl", "train.jsonl"):
        held_out |= {json.loads(line)["prompt"][len("What is "):-1] for line in open(os.path.join(ROOT, "data/tiny", name))}
    texts = [json.loads(line)["text"] for line in open(a)]
    seen = [set(re.findall(r"What is ([^?\n]+)\?", t)) | set(re.findall(r"^Problem: (.+)$", t, re.M))
            or {re.fullmatch(r"(.+)=-?\d+", t).group(1)} for t in texts]  # a question, a problem, or a bare fact
    assert all(len(s) == 1 for s in seen)  # one problem a document
    problems = [s.pop() for s in seen]
    assert len(set(problems)) == len(problems) and not set(problems) & held_out
    template = [t for t in texts if t.startswith(R1_ZERO_TEMPLATE.split("{")[0])]
    assert 0.25 < len(template) / len(texts) < 0.35  # the web-like share, in the template's shape
    worked = [t for t in template if "\n" in t]
    assert 0.3 < len(worked) / len(template) < 0.5  # mostly answered outright
    for t in template:
        completion = t.split("Assistant:", 1)[1]
        assert format_reward(completion, "answer_tag") == 1.0 and accuracy_reward(completion, str(
            tiny_task.answer(t.split("What is ", 1)[1].split("?")[0]))) == 1.0
    assert 0 < sum(count_rechecks(t) > 0 for t in texts) / len(texts) < 0.06  # a few re-check a step


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
