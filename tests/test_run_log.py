"""What a run leaves to look at: GRPO's rollouts.jsonl (every completion of every N-th step, exact across a resume),
sampled held-out eval (pass@1 / pass@K / maj@K), and out_dir/curves.svg from every trainer, also drawn by
`python plot.py METRICS`."""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

import plot
import train_sft
from helpers import write_jsonl
from test_grpo import _one_thread, _run, ckpt, data  # noqa: F401 (fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _svg_titles(path):
    root = ET.parse(path).getroot()  # well-formed XML, or this raises
    assert root.tag.endswith("svg")
    return [t.text for t in root.iter() if t.tag.endswith("text")]


def test_rollouts_log_every_completion_and_resume_appends_without_repeating(ckpt, data, tmp_path):
    kw = dict(max_steps=4, log_rollouts=2, eval_every=0, rewards="accuracy:1,language:1")
    _, _, _ = _run(ckpt, data, str(tmp_path / "whole"), **kw)
    whole = _lines(tmp_path / "whole" / "rollouts.jsonl")
    assert [r["step"] for r in whole] == [2] * 16 + [4] * 16  # 4 prompts x G=4, steps 2 and 4
    r = whole[0]
    assert set(r) >= {"step", "problem_index", "sample_index", "prompt", "text", "transcript", "answer", "reward",
                      "parts", "advantage", "finish_reason", "num_tokens"}
    assert set(r["parts"]) == {"accuracy", "language"} and r["finish_reason"] in ("stop", "length")
    assert "What is" in r["prompt"] and r["num_tokens"] >= 1
    for step in (2, 4):  # advantages are group-relative: each group's sum to 0
        for g in range(4):
            adv = [x["advantage"] for x in whole if x["step"] == step][4 * g:4 * g + 4]
            assert sum(adv) == pytest.approx(0, abs=1e-6)
    out = str(tmp_path / "resumed")
    _run(ckpt, data, out, save_every=2, stop_after=3, **kw)  # dies after step 3, its last checkpoint is step 2
    assert [r["step"] for r in _lines(os.path.join(out, "rollouts.jsonl"))] == [2] * 16
    _run(ckpt, data, out, resume=1, **kw)
    assert _lines(os.path.join(out, "rollouts.jsonl")) == whole
    _run(ckpt, data, str(tmp_path / "off"), **{**kw, "log_rollouts": 0})
    assert not os.path.exists(tmp_path / "off" / "rollouts.jsonl")


def test_sampled_eval_and_the_grpo_picture(ckpt, data, tmp_path):
    out = str(tmp_path / "run")
    _, stdout, metrics = _run(ckpt, data, out, max_steps=2, eval_every=1, eval_n=8, eval_samples=4,
                              eval_temperature=1.0, rewards="accuracy:1,language:1")
    assert "held-out sampled (T=1.0) pass@1" in stdout
    evals = [m for m in metrics if "eval_pass1" in m]
    assert [m["step"] for m in evals] == [0, 1, 2]  # before the first step, then every step
    for m in evals:
        assert 0 <= m["eval_pass1"] <= m["eval_pass_at_k"] <= 1 and 0 <= m["eval_maj_at_k"] <= m["eval_pass_at_k"]
    titles = _svg_titles(os.path.join(out, "curves.svg"))
    for name in ("reward (train)", "held-out accuracy", "completion length (tokens)", "KL and sampler mismatch"):
        assert name in titles
    assert "self-checks" not in titles  # nothing re-checked: a behaviour the run never showed gets no panel
    _, _, metrics = _run(ckpt, data, str(tmp_path / "greedy"), max_steps=1, eval_every=1, eval_n=8)
    assert not any("eval_pass1" in m for m in metrics)  # the default stays greedy only


def test_the_self_checks_panel_shows_once_a_completion_checks(tmp_path):
    records = [{"step": s, "reward": 0.5, "recheck_frac": 0.0, "accuracy_no_recheck": 0.5} for s in range(1, 4)]
    path = write_jsonl(tmp_path / "metrics.jsonl", records)
    assert "self-checks" not in _svg_titles(plot.write_curves(path))
    records[1].update(recheck_frac=0.25, accuracy_recheck=0.75)
    path = write_jsonl(tmp_path / "metrics.jsonl", records)
    assert "self-checks" in _svg_titles(plot.write_curves(path))


def test_sft_writes_its_picture_and_plot_draws_any_metrics_file(ckpt, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"What is {a}+{b}?"},
                          {"role": "assistant", "content": f"<think>\n{a}+{b}={a + b}\n</think>\n\\boxed{{{a + b}}}"}]}
            for a in range(8) for b in range(8)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    out = str(tmp_path / "sft")
    train_sft.main([f"--init_from={ckpt}", f"--data={data}", f"--out_dir={out}", "--max_steps=4", "--eval_every=2",
                    "--log_every=1", "--progress=0", "--batch_size=4", "--max_seq_len=64"])
    titles = _svg_titles(os.path.join(out, "curves.svg"))
    assert "loss" in titles and "pairwise accuracy" not in titles
    drawn = subprocess.run([sys.executable, os.path.join(ROOT, "plot.py"), os.path.join(out, "metrics.jsonl"),
                            str(tmp_path / "again.svg")], capture_output=True, text=True)
    assert drawn.returncode == 0 and "again.svg" in drawn.stdout
    assert "loss" in _svg_titles(tmp_path / "again.svg")
    assert plot.run_kind([{"step": 1, "kd_loss": 1.0}]) == "distill"
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "plot.py"), "/nonexistent.jsonl"], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "usage" in bad.stderr
