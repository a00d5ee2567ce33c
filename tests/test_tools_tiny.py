"""Tool use in miniature (config/tools_tiny.py from data/tiny/tool_start) and GRPO with tools end to end: the cold-start
mix, the tool-use counter against hand-labelled completions, the recipe, torchrun x2 == one process, exact resume."""
import contextlib
import filecmp
import io
import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import rejection
import tasks
import train_grpo
from configurator import read_recipe
from data import prepare_tools, tiny_task
from engine import Engine
from helpers import ScriptedLM, torchrun
from reward import combine_rewards
from tokenizer import Tokenizer
from tools import ToolUse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL_START = os.path.join(ROOT, "data", "tiny", "tool_start")


def test_mix_is_seeded_byte_stable_and_shares_no_problem_with_test_or_train(tmp_path):
    a, b, c = (str(tmp_path / f"{n}.jsonl") for n in "abc")
    prepare_tools.main([f"--out={a}", "--n=2000"])
    prepare_tools.main([f"--out={b}", "--n=2000"])
    prepare_tools.main([f"--out={c}", "--n=2000", "--seed=7"])
    assert filecmp.cmp(a, b, shallow=False) and not filecmp.cmp(a, c, shallow=False)
    rows = [json.loads(line) for line in open(a)]
    problems = [r["messages"][0]["content"][len("What is "):-1] for r in rows]
    assert len(set(problems)) == len(problems) and not set(problems) & prepare_tools.held_out_problems()
    tool_rows = [r for r in rows if "tool_calls" in r["messages"][1]]
    assert 0.17 < len(tool_rows) / len(rows) < 0.23  # a minority calls the calculator
    tok = Tokenizer.from_pretrained(TOOL_START)
    for r, expr in zip(rows, problems):
        answer = str(tiny_task.answer(expr))
        assert r["messages"][-1]["content"].endswith("\\boxed{" + answer + "}")
        if r in tool_rows:  # the whole expression to the calculator, its exact result read back
            call = r["messages"][1]["tool_calls"][0]["function"]
            assert call == {"name": "calculator", "arguments": {"expression": expr}} and r["messages"][2] == \
                {"role": "tool", "content": answer}
            tok.encode_chat_with_mask(r["messages"])  # renders with the tiny template's tool turns


HAND_LABELLED = [  # (what the model writes in its first turn, does it call a tool)
    ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n</tool_call>', True),
    ("<think>\n2+3=5\n</think>\n\\boxed{5}", False),
    ("I would use the calculator here, but 2+3=5. \\boxed{5}", False),
    ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "2"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "calculator", "arguments": {"expression": "3"}}\n</tool_call>', True),
    ('<tool_call>\n{"name": "calculator", "arguments": {"expression": }\n</tool_call>', True),  # tried: malformed
    ("```python\nprint(2+3)\n```\n\\boxed{5}", False),  # a fence is no call in the chat format
]


def test_tool_use_counter_matches_hand_labelled_completions():
    tok = Tokenizer.from_pretrained(TOOL_START)
    im_end, header = tok.token_to_id("<|im_end|>"), tok.encode("<|im_start|>assistant\n")
    prompts = [tok.encode(f"q{i}") for i in range(len(HAND_LABELLED))]
    first = [tok.encode(text) + [im_end] for text, _ in HAND_LABELLED]
    answer = tok.encode("\\boxed{5}") + [im_end]

    def next_logits(history):  # row i writes its hand-written turn, then (after any tool turn) a boxed answer
        i = next(k for k, p in enumerate(prompts) if history[:len(p)] == p)
        done = history[len(prompts[i]):]
        after = [j + len(header) for j in range(len(done)) if done[j:j + len(header)] == header]
        script, at = (answer, len(done) - after[-1]) if after else (first[i], len(done))
        logits = torch.full((tok.vocab_size,), -30.0)
        logits[script[at] if at < len(script) else im_end] = 30.0
        return logits

    engine = Engine(ScriptedLM(tok.vocab_size, next_logits), tok)
    outs = [o[0] for o in engine.generate(prompts, max_new_tokens=240, temperature=0.0,
                                          tools=ToolUse(tok, ["calculator"]))]
    assert [bool(c.tool_calls) for c in outs] == [label for _, label in HAND_LABELLED]
    metrics = train_grpo.tool_metrics(outs)
    assert metrics["tool_use"] == pytest.approx(3 / 6) and metrics["tool_calls"] == pytest.approx(4 / 6)
    assert metrics["tool_error_frac"] == pytest.approx(1 / 4)  # the malformed one


def test_evaluation_rejection_sampling_and_grpo_hand_on_one_record(monkeypatch):
    """score_problems, rejection_sample and generate_groups hand on the same record, a tasks.Rollout, for the same
    completion, and its text means the same in all three: what the model wrote, what each one scores, never the
    calculator's turn (that is in the transcript, for logs)."""
    tok = Tokenizer.from_pretrained(TOOL_START)
    row = {"prompt": "What is 2+3?", "answer": "5"}
    prompt = tasks.encode_problem(tok, row)
    im_end, header = tok.token_to_id("<|im_end|>"), tok.encode("<|im_start|>assistant\n")
    wrote = ['<think>\n2+3<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n</tool_call>',
             "=5\n</think>\n\\boxed{5}"]  # its turn before the call, and after the tool turn
    turns = [tok.encode(t) + [im_end] for t in wrote]

    def next_logits(history):
        done = history[len(prompt):]
        after = [j + len(header) for j in range(len(done)) if done[j:j + len(header)] == header]
        script, at = (turns[1], len(done) - after[-1]) if after else (turns[0], len(done))
        logits = torch.full((tok.vocab_size,), -30.0)
        logits[script[at] if at < len(script) else im_end] = 30.0
        return logits

    engine = Engine(ScriptedLM(tok.vocab_size, next_logits), tok)
    sampling = dict(max_new_tokens=160, temperature=0.0, tools=ToolUse(tok, ["calculator"]))
    evaluated, _ = tasks.score_problems(engine, [row], [prompt], 2, sampling, progress=False)
    checked, real_sample_problems = [], rejection.sample_problems

    def recording(*args, **kwargs):  # rejection sampling's results, per problem (reasons, the kept Rollouts)
        checked.extend(real_sample_problems(*args, **kwargs))
        return checked

    monkeypatch.setattr(rejection, "sample_problems", recording)
    kept_rows, _ = rejection.rejection_sample(engine, tok, [row], num_samples=1, sampling=sampling)
    cfg = train_grpo.configure(["--group_size=2", "--tools=calculator"])
    items = [{"row": row, "ids": prompt, "where": "test:1"}]
    groups, _ = train_grpo.generate_groups(engine, items, 0, 0, cfg, SimpleNamespace(rank=0, world=1),
                                           combine_rewards("accuracy:1"), sampling)
    records = evaluated[0] + checked[0][1] + groups[0]
    assert len(records) == 5 and {type(r) for r in records} == {tasks.Rollout}
    for r in records:
        assert r.text == "<|im_end|>".join(wrote) == r.completion.text  # the model's two turns, nothing else
        assert "<tool_response>\n5\n</tool_response>" in r.completion.transcript
        assert r.accuracy == 1.0 and r.correct and r.pred == "5" and r.answer == "5" and r.rechecks == 0
        line = json.loads(json.dumps(r.record()))
        assert (line["text"], line["transcript"], line["pred"]) == (r.text, r.completion.transcript, "5")
        assert line["tool_calls"] == [dict(name="calculator", arguments={"expression": "2+3"}, result="5",
                                           error=None)]
    assert [r.parts for r in records] == [{"accuracy": 1.0, "format": 1.0}] * 2 + \
        [{"format": 1.0, "language": 1.0, "accuracy": 1.0}] + [{"accuracy": 1.0}] * 2
    assert kept_rows[0]["messages"][-1] == {"role": "assistant", "content": records[2].text}


def _run(out, **kw):
    """config/tools_tiny.py from the shipped tool_start, cut down to a few small steps."""
    args = dict(max_steps=2, prompts_per_step=4, group_size=4, eval_every=0, progress=0, sample_every=0,
                out_dir=out, log_rollouts=1, warmup_steps=1)
    args.update(kw)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        flags = [f"--{k}={v}" for k, v in args.items()]
        result = train_grpo.main([os.path.join(ROOT, "config", "tools_tiny.py")] + flags)
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return result, buf.getvalue(), metrics


def test_recipe_parses_and_runs_with_tools(tmp_path):
    recipe = read_recipe(os.path.join(ROOT, "config", "tools_tiny.py"), {k: getattr(train_grpo, k)
                                                                           for k in train_grpo.CONFIG_KEYS})
    assert recipe["tools"] == "calculator" and recipe["init_from"] == "data/tiny/tool_start"
    result, out, metrics = _run(str(tmp_path / "run"), eval_every=2, eval_n=16)
    assert "tools: calculator in the chat format" in out
    assert "held-out tool use (greedy): before" in out.split("held-out accuracy: before")[1].splitlines()[1]
    for m in metrics[1:]:
        for k in ("tool_calls", "tool_use", "tool_error_frac", "tool_token_frac", "pad_frac", "micro_batches"):
            assert k in m, k
    assert sum(m["tool_calls"] for m in metrics[1:]) > 0 and any(m["tool_token_frac"] > 0 for m in metrics[1:])
    assert any("reward_tool" in m for m in metrics[1:])  # (logged for the steps in which some completion called)
    lines = [json.loads(line) for line in open(tmp_path / "run" / "rollouts.jsonl")]
    called = [r for r in lines if r["tool_calls"]]
    assert called and all("<tool_response>" in r["transcript"] and r["tool_tokens"] > 0 for r in called)
    assert not any("<tool_response>" in r["text"] for r in called)  # the model's own, what the rewards read


def test_kill_and_resume_with_tools_is_exact(tmp_path):
    kw = dict(max_steps=3, save_every=1)
    _run(str(tmp_path / "full"), **kw)
    _run(str(tmp_path / "resumed"), stop_after=2, **kw)
    _, out, _ = _run(str(tmp_path / "resumed"), resume=1, **kw)
    assert "at step 2" in out
    a = load_file(str(tmp_path / "full" / "ckpt" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "ckpt" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_ranks_with_tools_equal_one_process(tmp_path):
    """In fp64: Qwen2's k_proj biases have ~0 true gradients that AdamW turns into lr-sized steps from the rounding
    of another summation order (see test_grpo's DDP test)."""
    common = dict(max_steps=2, prompts_per_step=4, group_size=4, eval_every=0, progress=0, sample_every=0,
                  warmup_steps=0, dtype="float64")
    flags = [os.path.join(ROOT, "config", "tools_tiny.py")] + [f"--{k}={v}" for k, v in common.items()]
    torchrun("train_grpo.py", flags + [f"--out_dir={tmp_path / 'ddp'}"])
    _run(str(tmp_path / "one"), **{**common, "log_rollouts": 0})
    m_ddp = [json.loads(line) for line in open(tmp_path / "ddp" / "metrics.jsonl")]
    m_one = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl")]
    for a, b in zip(m_ddp, m_one):
        for k in ("reward", "completion_len", "tool_calls", "tool_error_frac", "tool_token_frac", "trained_rollouts"):
            assert a[k] == pytest.approx(b[k], rel=1e-6), k
    assert sum(m["tool_calls"] for m in m_one) > 0
    a = load_file(str(tmp_path / "ddp" / "ckpt" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "ckpt" / "model.safetensors"))
    init = load_file(os.path.join(TOOL_START, "model.safetensors"))
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-5  # (two steps at the recipe's lr)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-10
