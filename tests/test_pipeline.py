"""The whole R1 recipe on the embedded world, in miniature (a few steps a stage, CPU): cold-start SFT -> reasoning
RL (GRPO) -> rejection sampling -> SFT on the mix with general data -> reward model -> RL for all scenarios with it ->
distillation into the small student. Each stage reads what the previous one wrote."""
import contextlib
import io
import json
import os

import pytest
import torch

import distill
import sample
import train_grpo
import train_sft
from model import RewardModel, Transformer
from tests.helpers import write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "data/tiny")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _quiet(fn, argv):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        res = fn(argv)
    return res, out.getvalue()


def test_r1_recipe_end_to_end(tmp_path):
    problems = [json.loads(line) for line in open(os.path.join(TINY, "train.jsonl"))]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", problems[:64])
    held_out = write_jsonl(tmp_path / "held_out.jsonl", [json.loads(line) for line in open(os.path.join(TINY, "test.jsonl"))][:16])
    general = os.path.join(TINY, "general.jsonl")
    grpo = dict(group_size=4, prompts_per_step=4, max_completion_len=64, progress=0, sample_every=0, warmup_steps=1,
                eval_data=held_out, eval_n=16, eval_every=2, max_steps=2)
    flags = lambda d: [f"--{k}={v}" for k, v in d.items()]  # noqa: E731

    # 1. cold start: SFT of the base on R1-format CoT rows (here from the cold-started checkpoint, a few steps, so the
    #    later stages have a model that solves some problems)
    cold = tmp_path / "cold"
    res, _ = _quiet(train_sft.main, [f"--init_from={TINY}/rl_start", f"--data={TINY}/coldstart.jsonl", "--max_steps=3",
                                     "--lr=1e-4", f"--out_dir={cold}", "--progress=0", "--eval_every=0"])
    assert res["step"] == 3

    # 2. reasoning RL
    rl = tmp_path / "rl"
    res, out = _quiet(train_grpo.main, flags({**grpo, "init_from": cold / "ckpt", "data": prompts, "out_dir": rl}))
    assert res["step"] == 2 and "held-out accuracy: before" in out

    # 3. rejection sampling of the RL model, then SFT on the mix with general (non-reasoning) chat
    rejected = tmp_path / "rejected.jsonl"
    _quiet(sample.main, ["--reject=1", f"--init_from={rl / 'ckpt'}", f"--data={prompts}", "--num_samples=4",
                         "--temperature=1.0", "--max_new_tokens=96", f"--out={rejected}"])
    kept = [json.loads(line) for line in open(rejected)]
    assert kept and all(r["parts"]["accuracy"] == 1.0 for r in kept)
    stage3 = tmp_path / "stage3"
    res, _ = _quiet(train_sft.main, [f"--init_from={rl / 'ckpt'}", f"--data={rejected}:0.75,{general}:0.25",
                                     "--max_steps=3", "--lr=1e-4", f"--out_dir={stage3}", "--progress=0",
                                     "--eval_every=0"])
    assert res["step"] == 3

    # 4. a reward model on preference pairs, then RL for all scenarios: rule rewards and the RM on one batch
    rm = tmp_path / "rm"
    res, _ = _quiet(train_sft.main, ["--mode=rm", f"--init_from={stage3 / 'ckpt'}", f"--data={TINY}/prefs.jsonl",
                                     "--max_steps=3", "--batch_size=8", f"--out_dir={rm}", "--progress=0",
                                     "--eval_every=0", "--eval_frac=0"])
    assert RewardModel.from_pretrained(str(rm / "ckpt")).num_labels == 1
    stage4 = tmp_path / "stage4"
    res, out = _quiet(train_grpo.main, flags({
        **grpo, "init_from": stage3 / "ckpt", "data": f"{prompts}:0.5,{TINY}/general_prompts.jsonl:0.5",
        "reward_model": rm / "ckpt", "eval_rm_data": f"{TINY}/general_test.jsonl", "eval_rm_n": 8,
        "out_dir": stage4}))
    assert "held-out reward-model score: before" in out
    metrics = [json.loads(line) for line in open(stage4 / "metrics.jsonl")]
    assert any("reward/rm" in m for m in metrics) and any("reward/accuracy" in m for m in metrics)

    # 5. distillation of the final model into the smaller student (sequence mode: R1's)
    res = distill.main([f"--teacher={stage4 / 'ckpt'}", f"--init_from={TINY}/student", f"--data={prompts}",
                        "--n_prompts=32", f"--eval_data={held_out}", "--eval_n=16", "--max_steps=3",
                        f"--out_dir={tmp_path / 'distill'}", "--progress=0"])
    assert res["finished"] and res["teacher"] is not None and res["after"] is not None
    student = Transformer.from_pretrained(str(tmp_path / "distill" / "ckpt"))
    assert student.num_params() < Transformer.from_pretrained(str(stage4 / "ckpt")).num_params()
