"""R1-Zero in miniature: the zero base's pretraining corpus (data/prepare_zero.py), the checked solutions in it,
R1-Zero's format and accuracy rewards, the check counter and its report, and config/r1zero_tiny.py end to end."""
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
from data.tiny_task import Check, read_checks
from tasks import R1_ZERO_TEMPLATE, count_rechecks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _layout(text):
    """A corpus document -> (layout, problem, reply), or ("table", None, text) for a table of single operations."""
    if text.startswith("Check each step: "):
        head, reply = text.split("\n", 1)
        return "drill", head[len("Check each step: "):], reply
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
    prepare_zero.main([f"--out={a}", "--n=4000", "--drills=400", "--tables=400"])
    prepare_zero.main([f"--out={b}", "--n=4000", "--drills=400", "--tables=400"])
    assert filecmp.cmp(a, b, shallow=False) and prepare_zero.R1_ZERO == R1_ZERO_TEMPLATE
    prepare_zero.main([f"--out={b}", "--n=4000", "--drills=400", "--tables=400", "--seed=7"])
    assert not filecmp.cmp(a, b, shallow=False)
    held_out = set()
    for name in ("test.jsonl", "train.jsonl"):
        held_out |= {json.loads(line)["prompt"][len("What is "):-1] for line in open(os.path.join(ROOT, "data/tiny", name))}
    docs = [_layout(json.loads(line)["text"]) for line in open(a)]
    problems = [p for _, p, _ in docs if p is not None]
    assert len(problems) == 4000 + 400 and len(set(problems)) == len(problems) and not set(problems) & held_out
    tables = [t for layout, _, t in docs if layout == "table"]
    assert len(tables) == 400
    for line in (line for t in tables for line in t.split("\n")):  # one operation a line, right, not a problem
        a, op, b, value = re.fullmatch(r"(-?\d+)([-+*])(\d+|\(-\d+\))=(-?\d+)", line).groups()
        assert tiny_task.OPS[op](int(a), int(b.strip("()"))) == int(value)


def test_every_layout_answers_mostly_outright_and_works_a_minority(tmp_path):
    path = str(tmp_path / "a.jsonl")
    prepare_zero.main([f"--out={path}", "--n=4000", "--drills=500", "--tables=10"])
    docs = [_layout(json.loads(line)["text"]) for line in open(path)]
    by_layout = {}
    for layout, expr, reply in docs:
        if layout in ("table", "drill"):
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
    assert 0.2 < len(by_layout["template"]) / sum(map(len, by_layout.values())) < 0.3
    for layout, worked in by_layout.items():
        assert 0.2 < sum(worked) / len(worked) < 0.4, layout  # mostly outright, in every layout
    texts = [json.loads(line)["text"] for line in open(path)]
    drills = [t for t in texts if _layout(t)[0] == "drill"]
    texts = [t for t in texts if _layout(t)[0] != "drill"]
    for t in texts:
        if t.startswith(R1_ZERO_TEMPLATE.split("{")[0]):
            completion = t.split("Assistant:", 1)[1]
            assert format_reward(completion, "answer_tag") == 1.0 and accuracy_reward(completion, str(
                tiny_task.answer(t.split("What is ", 1)[1].split("?")[0]))) == 1.0
    checked = sum(count_rechecks(t) > 0 for t in texts) / sum(w for ws in by_layout.values() for w in ws)
    assert 0.05 < checked < 0.11  # a few worked solutions check their steps (8 in 100)
    assert len(drills) == 500
    for t in drills:  # the exercises check every step, and end right
        expr, reply = _layout(t)[1:]
        assert len(read_checks(reply)) == len(tiny_task.solve(expr))
        assert reply.endswith(f"The answer is {tiny_task.answer(expr)}.")


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


def test_checked_lines_substitute_each_result_back_and_settle_every_disagreement():
    rng, n = random.Random(0), {"checks": 0, "slips": 0, "check slips": 0}
    for _ in range(400):
        expr = tiny_task.generate(rng)
        right, lines = tiny_task.solution_lines(expr), tiny_task.checked_lines(expr, rng, 0.5, 0.3, 0.2)
        kept, i = [], 0  # the lines the work goes on from
        while i < len(lines):
            if not lines[i + 1:i + 2] or not lines[i + 1].startswith("Check: "):
                assert lines[i] == right[len(kept)]  # an unchecked step is never a slip
                kept.append(lines[i])
                i += 1
                continue
            a, op, b, written = re.fullmatch(r"(-?\d+)([-+*])(\(-\d+\)|\d+)=(-?\d+).*", lines[i]).groups()
            a, b, written = int(a), int(b.strip("()")), int(written)
            computation, must_give = tiny_task.check_line(a, op, b, written)
            m = re.fullmatch(r"Check: (.+)=(-?\d+)(, not (-?\d+))?", lines[i + 1])
            assert m.group(1) == computation and (m.group(3) is None) == (int(m.group(2)) == must_give)
            n["checks"] += 1
            if written != tiny_task.OPS[op](a, b):  # a slip: the check computes right, disagrees, and it is fixed
                n["slips"] += 1
                assert int(m.group(2)) == tiny_task.evaluate(computation) and m.group(4) == str(must_give)
            elif m.group(3):  # the check slipped: the step worked again stands as written
                n["check slips"] += 1
                assert lines[i + 2] == lines[i]
            if m.group(3):
                assert lines[i + 2] == right[len(kept)]
                i += 1
            kept.append(right[len(kept)])
            i += 2
        assert kept == right
        found = read_checks("\n".join(lines))
        assert len(found) == sum(line.startswith("Check: ") for line in lines)
        assert all(c.fixed == c.changed for c in found)  # each one that changes a step fixes a slip
    assert n["checks"] > 400 and 0.2 < n["slips"] / n["checks"] < 0.4  # at least one check each; most agree
    assert 0.1 < n["check slips"] / (n["checks"] - n["slips"]) < 0.3


def test_tokenize_reads_the_negative_numbers_of_a_worked_lines_rest():
    assert tiny_task.tokenize("-54-(-3)") == [-54, "-", -3]
    assert tiny_task.tokenize("19-(-4+12)*(-2)") == [19, "-", "(", -4, "+", 12, ")", "*", -2]
    assert tiny_task.evaluate("19-(-4+12)*(-2)") == 35
    rng = random.Random(1)
    for _ in range(500):  # every rest of every worked solution reads back as the tokens it was rendered from
        for *_, rest in tiny_task.solve(tiny_task.generate(rng)):
            assert tiny_task.tokenize(tiny_task.render(rest)) == rest


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


AGREES = " <think>\n13*4=52, so 20-52+9\nCheck: 4*13=52\n20-52=-32, so -32+9"  # 20-13*4+9
CATCHES = "13*4=52, so 20-52+9\n20-52=-22, so -22+9\nCheck: -22+52=30, not 20\n20-52=-32, so -32+9\n-32+9=-23"
CHECK_SLIPS = "20-52=-32, so -32+9\nCheck: -32+52=21, not 20\n20-52=-32, so -32+9"


@pytest.mark.parametrize("text, n", [
    ("8*3=24, so 7+24\n7+24=31", 0),
    (AGREES, 1),  # a check that agrees
    (CATCHES, 1),  # a slip caught and fixed
    (CHECK_SLIPS, 1),  # a check that slips, settled by working the step again
    (CATCHES + "\nCheck: -23-9=-32\nCheck: -23-9=-32", 2),  # a check below a check checks nothing
    ("8*3=21\nWait, 8*3=24, so 7+24\n7+24=31", 1),  # the old corpus's "Wait"
    ("<think> 8*3=21\nWait, 8*3=24\n7+24=32\nwait, 7+24=31 </think>", 2),
    ("<think>Wait, wait. Wait. That's an aha moment I can flag here.", 1),  # R1-Zero's (one line)
    ("Let me check: 24+7 is 31.\nHmm, right.\nRe-check the sum.\nDouble-check done.", 4),
    ("I will wait for it.\nThe awaited answer is 3.\nA check mark: 7", 0),  # not at a line's start
    # look like checks, are not: no computation, no value, another word, nothing checked above, not at the start
    ("20-52=-32\nCheck: fine\nCheck: -32\nCheck 20-52=-32\nChecked: 52-20=32\nCheck: 20-52", 0),
    ("Check: -32+52=20\nThe answer is -32.\nCheck: -32+52=20\n20-52=-32 so Check: -32+52=20", 0),
    ("20-52=-32, so -32+9\nCheck: 52-20=32\n7+8=15\nCheck: 4*13=52\n13*4=52\nCheck: 13*4=52", 0),  # another step's
])
def test_count_rechecks_matches_hand_labels(text, n):
    assert count_rechecks(text) == n


@pytest.mark.parametrize("text, checks", [
    (AGREES, [Check("13*4=52, so 20-52+9", "Check: 4*13=52", None)]),
    (CATCHES, [Check("20-52=-22, so -22+9", "Check: -22+52=30, not 20", "20-52=-32, so -32+9")]),
    (CHECK_SLIPS, [Check("20-52=-32, so -32+9", "Check: -32+52=21, not 20", "20-52=-32, so -32+9")]),
    (CATCHES + "\nCheck: -23-9=-32", [Check("20-52=-22, so -22+9", "Check: -22+52=30, not 20",
                                             "20-52=-32, so -32+9"), Check("-32+9=-23", "Check: -23-9=-32", None)]),
])
def test_read_checks_on_hand_labelled_completions(text, checks):
    assert read_checks(text) == checks


@pytest.mark.parametrize("written, check, redone, disagreed, changed, fixed", [
    ("20-52=-32, so -32+9", "-32+52=20", "", False, False, False),  # confirms a right step
    ("20-52=-22, so -22+9", "-22+52=20", "", False, False, False),  # its own slip: misses the wrong result
    ("20-52=-22, so -22+9", "-22+52=30, not 20", "20-52=-32, so -32+9", True, True, True),  # catches it, fixes it
    ("20-52=-22, so -22+9", "-22+52=30, not 20", "20-52=-42, so -42+9", True, True, False),  # catches, slips again
    ("20-52=-32, so -32+9", "-32+52=21, not 20", "20-52=-32, so -32+9", True, False, False),  # slips, step stands
    ("20-52=-32, so -32+9", "-32+52=21, not 20", "20-52=-32", True, False, False),  # ... the rest left out
    ("20-52=-32, so -32+9", "-32+52=21, not 20", "20-52=-22, so -22+9", True, True, False),  # slips, breaks it
    ("20-52=-22, so -22+9", "-22+52=30, not 20", "The answer is 30.", True, False, False),  # does nothing
    ("20-52=-22, so -22+9", "-22+52=30, not 20", "-22+9=-13", True, False, False),  # ... goes on to the next step
])
def test_what_a_check_did(written, check, redone, disagreed, changed, fixed):
    (found,) = read_checks(f"{written}\nCheck: {check}\n{redone}")
    assert (found.disagreed, found.changed, found.fixed) == (disagreed, changed, fixed)


def test_check_report_lines():
    steps = range(1, 31)
    hist = {"recheck_frac": [(s, 0.01 if s <= 10 else 0.3) for s in steps],
            "accuracy_recheck": [(s, 0.8 if s > 20 else 0.1) for s in steps if s % 2],  # logged where one checked
            "accuracy_no_recheck": [(s, 0.6) for s in steps], "checks_agree": [(s, 3) for s in steps],
            "checks_disagree": [(s, 2) for s in steps], "checks_change": [(s, 1) for s in steps],
            "checks_fix": [(s, 1) for s in steps if s % 3 == 0]}
    assert train_grpo.check_report(hist) == [
        "sampled completions that re-check a step: first 10 steps 1.0% -> last 10 steps 30.0%; over the last 10 "
        "steps right 80.0% of the time against 60.0% for the others",
        "checks over the run: 90 agreed with the step as written, 60 disagreed, 30 of those changed the step (10 "
        "fixing a slip)"]
    wait_only = {"recheck_frac": [(1, 0.5)], "checks_agree": [(1, 0)], "checks_disagree": [(1, 0)]}  # no tiny check
    assert len(train_grpo.check_report(wait_only)) == 1
    assert train_grpo.check_report({"recheck_frac": [(1, 0.0)]}) is None and train_grpo.check_report({}) is None


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
    assert all("reward/format_answer" in m and "recheck_frac" in m and "checks_fix" in m for m in metrics[1:])
    assert all(k in metrics[-1] for k in ("eval_accuracy", "eval_completion_len", "eval_format", "eval_recheck_frac"))
