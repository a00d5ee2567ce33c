"""train_grpo.py --reward_model (R1 stage 4): rows with an answer get the rule rewards, rows without one a frozen
RewardModel's score; each group scored by the right source, the logged components, and the bad-input errors."""
import contextlib
import io
import json
import os
import re
import shutil

import pytest
import torch

import reward
import tasks
import train_grpo
from helpers import make_tiny_checkpoint, make_tiny_tokenizer, write_jsonl
from model import RewardModel
from tokenizer import IM_END, Tokenizer


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on shared cores: see tests/test_grpo.py
    yield
    torch.set_num_threads(n)


def _reward_model(src, path, std=1.0):
    """A random reward model on src's body (a head with std 1 so scores differ visibly) + src's tokenizer files."""
    torch.manual_seed(0)
    RewardModel.from_causal_lm(src, std=std).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, name), path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("rm")
    ckpt = make_tiny_checkpoint(str(d / "ckpt"), std=0.1)
    rm = _reward_model(ckpt, str(d / "rm"))
    rule = write_jsonl(d / "rule.jsonl", [{"prompt": f"What is {a}+{b}?", "answer": str(a + b)}
                                          for a in range(4) for b in range(4)])
    general = write_jsonl(d / "general.jsonl", [{"prompt": f"Say something about {w}."}
                                                for w in ("cats", "rain", "tea", "maps", "salt", "bread")])
    return ckpt, rm, rule, general


def _run(ckpt, data, out, **kw):
    args = dict(init_from=ckpt, data=data, eval_every=0, max_steps=2, group_size=4, prompts_per_step=4,
                max_completion_len=16, out_dir=out, progress=0, sample_every=0, warmup_steps=1, lr=1e-3,
                rewards="accuracy:1,language:1")
    args.update(kw)
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        train_grpo.main([f"--{k}={v}" for k, v in args.items()])
    return buf.getvalue(), [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_mixed_rule_and_reward_model_rows(setup, tmp_path, monkeypatch):
    ckpt, rm_dir, rule, general = setup
    steps = []  # the scored groups of each step, as generate_groups returned them
    real = train_grpo.generate_groups

    def recording(*args, **kw):
        groups, n_tok = real(*args, **kw)
        steps.append(groups)
        return groups, n_tok

    monkeypatch.setattr(train_grpo, "generate_groups", recording)
    weight = 0.5
    stdout, metrics = _run(ckpt, f"{rule}:0.5,{general}:0.5", str(tmp_path / "out"), reward_model=rm_dir,
                           reward_model_weight=weight)
    assert "6 for the reward model" in stdout and f"reward model {rm_dir}" in stdout
    assert len(steps) == len(metrics) == 2

    # each RM-scored sample's reward is weight x the score recomputed here, one unpadded row at a time
    rm = RewardModel.from_pretrained(rm_dir, dtype=torch.float32).eval()
    tok = Tokenizer.from_pretrained(ckpt)
    im_end = tok.token_to_id(IM_END)
    kinds = set()
    for groups, m in zip(steps, metrics):
        rule_samples, rm_samples = [], []
        for g in groups:
            row = g[0].item["row"]
            by_rm = "answer" not in row
            kinds.add(by_rm)
            for s in g:
                if not by_rm:  # the rule rewards, as without a reward model
                    assert set(s.parts) == {"accuracy", "language"}
                    total, _ = reward.combine_rewards("accuracy:1,language:1")(s.completion.text, row)
                    assert s.reward == total
                    rule_samples.append(s)
                    continue
                assert set(s.parts) == {"rm"} and s.accuracy is None
                # the RM reads what train_sft --mode=rm trains it on: the conversation with the completion as the
                # closed assistant turn (ChatML: ... <|im_end|>\n)
                messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": s.completion.text}]
                ids = torch.tensor([tok.encode_chat_with_mask(messages)[0]])
                assert ids[0, -2] == im_end
                with torch.no_grad():
                    score = float(rm(ids))
                assert s.parts["rm"] == pytest.approx(score, rel=1e-4, abs=1e-5)
                assert s.reward == pytest.approx(weight * score, rel=1e-4, abs=1e-5)
                rm_samples.append(s)
        # components: each over the samples it scored; reward: the mean total over all of them
        everything = rule_samples + rm_samples
        assert m["reward"] == pytest.approx(sum(s.reward for s in everything) / len(everything), abs=1e-4)
        for name, samples in (("rm", rm_samples), ("accuracy", rule_samples), ("language", rule_samples)):
            if samples:
                want = sum(s.parts[name] for s in samples) / len(samples)
                assert m[f"reward/{name}"] == pytest.approx(want, rel=1e-4, abs=1e-4)
            else:
                assert f"reward/{name}" not in m
    assert kinds == {True, False}  # both sources were drawn
    assert any("reward/rm" in m for m in metrics)
    assert any(m["trained_rollouts"] > 0 for m in metrics)  # RM scores differ within a group: non-zero advantages


def test_rows_without_answer_need_a_reward_model(setup, tmp_path):
    ckpt, rm_dir, rule, general = setup
    with pytest.raises(SystemExit, match=r"general\.jsonl:1: missing field.*'answer'.*--reward_model=DIR"):
        _run(ckpt, f"{rule},{general}", str(tmp_path / "x"))


def test_bad_reward_model_dirs(setup, tmp_path):
    ckpt, rm_dir, rule, general = setup
    # a causal LM is not a reward model: the error names the dir, the file and the missing key
    with pytest.raises(SystemExit, match=re.escape(f"--reward_model={ckpt}: {os.path.join(ckpt, 'model.safetensors')}")
                       + ".*no score.weight"):
        _run(ckpt, general, str(tmp_path / "x"), reward_model=ckpt)
    with pytest.raises(SystemExit, match="reward_model=.*nowhere.*config.json"):
        _run(ckpt, general, str(tmp_path / "x"), reward_model=str(tmp_path / "nowhere"))
    # the RM reads the policy's token ids: a smaller vocabulary, or another tokenizer, is refused
    small = _reward_model(make_tiny_checkpoint(str(tmp_path / "small_lm"), vocab_size=100), str(tmp_path / "small"))
    with pytest.raises(SystemExit, match=r"vocabulary \(100 ids\) does not cover"):
        _run(ckpt, general, str(tmp_path / "x"), reward_model=small)
    other = _reward_model(ckpt, str(tmp_path / "other"))
    make_tiny_tokenizer(other, vocab_size=280)
    with pytest.raises(SystemExit, match="tokenizer.json is not the policy's tokenizer"):
        _run(ckpt, general, str(tmp_path / "x"), reward_model=other)


def test_held_out_reward_model_score_is_evaluated_and_printed(setup, tmp_path):
    """--eval_rm_data: the mean RM score of greedy completions on held-out general prompts, before and after, equal
    to scoring those completions directly with the reward model."""
    ckpt, rm_dir, rule, general = setup
    out, lines = _run(ckpt, f"{rule}:0.5,{general}:0.5", str(tmp_path / "o"), reward_model=rm_dir, eval_every=2,
                      eval_data=rule, eval_n=4, eval_rm_data=general, eval_rm_n=3)
    m = re.search(r"held-out reward-model score: before (-?[\d.]+) -> after (-?[\d.]+)", out)
    assert m, out
    assert lines[-1]["eval_rm_score"] == pytest.approx(float(m.group(2)), abs=1e-3)
    # the 'before' figure is the RM's score of the initial policy's greedy completions
    from sample import Engine, encode_problem
    from model import Transformer
    tok = Tokenizer.from_pretrained(ckpt)
    rows = [json.loads(line) for line in open(general)][:3]
    engine = Engine(Transformer.from_pretrained(ckpt).eval(), tok)
    texts = [o[0].text for o in engine.generate([encode_problem(tok, r, "chat") for r in rows], max_new_tokens=16,
                                                temperature=0.0)]
    scorer = tasks.RewardModelScorer(rm_dir, tok, 1.0, "cpu", torch.float32, 8)
    direct = sum(scorer([(r, t) for r, t in zip(rows, texts)])) / 3
    assert float(m.group(1)) == pytest.approx(direct, abs=1e-3)


def test_held_out_reward_model_prompts_need_a_reward_model(setup, tmp_path):
    ckpt, _, rule, general = setup
    with pytest.raises(SystemExit, match="--eval_rm_data=.*needs --reward_model"):
        _run(ckpt, rule, str(tmp_path / "o"), eval_every=1, eval_rm_data=general, rewards="accuracy:1")
