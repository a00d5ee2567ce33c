"""train_sft.py --mode=rm: Bradley-Terry loss/gradient, pair rows and their errors, learning a separable preference,
RM/LM init detection, exact resume, DDP == one process."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import dataloader
import model
import train_sft
from helpers import make_tiny_checkpoint, torchrun, write_jsonl
from model import RewardModel
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    make_tiny_checkpoint(path, std=0.02, vocab_size=320)
    return str(path)


def _pair(a, b, style):
    """One preference row; chosen says yes, rejected says no (trivially separable), in one of three layouts."""
    q, yes, no = f"What is {a}+{b}?", f"yes, {a + b}", f"no, {a + b}"
    if style == "prompt":
        return {"prompt": q, "chosen": yes, "rejected": no}
    if style == "messages":  # context + the responses as message lists (TRL's explicit-prompt layout)
        return {"messages": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": yes}],
                "rejected": [{"role": "assistant", "content": no}]}
    conv = [{"role": "user", "content": q}]  # whole conversations, no prompt key (Anthropic HH layout)
    return {"chosen": conv + [{"role": "assistant", "content": yes}],
            "rejected": conv + [{"role": "assistant", "content": no}]}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    styles = ["prompt", "messages", "conversation"]
    rows = [_pair(a, b, styles[(a + b) % 3]) for a in range(12) for b in range(10)]  # 120 pairs
    return write_jsonl(d / "pairs.jsonl", rows)


def _cfg(**kw):
    return train_sft.configure([f"--{k}={v}" for k, v in {"mode": "rm", **kw}.items()])

def _data(cfg):
    """load_examples' keywords from a train_sft config."""
    return dict(mode=cfg.mode, max_seq_len=cfg.max_seq_len, skip_bad_rows=cfg.skip_bad_rows)



def _run(ckpt, data, out, **kw):
    args = dict(mode="rm", init_from=ckpt, data=data, out_dir=out, max_seq_len=64, batch_size=8, max_steps=6,
                lr=3e-3, warmup_steps=2, eval_frac=0.2, eval_every=3, progress=0, log_every=1, weight_decay=0)
    args.update(kw)
    return train_sft.main([f"--{k}={v}" for k, v in args.items()])


# -----------------------------------------------------------------------------
# the loss


def test_bradley_terry_loss_and_gradient_match_the_direct_formula(ckpt):
    """pair_loss_sum on a right-padded batch == mean of -log(sigmoid(r_c - r_r)) over the pairs, each sequence scored
    alone and unpadded, in value and in every parameter's gradient; the ranked-right count too. In fp64: in fp32 an
    element near 0 of the gradient moved 1.2e-6 (0.14% of it) under MKL's AVX2 kernels."""
    torch.manual_seed(0)
    rm = RewardModel.from_causal_lm(ckpt, pad_token_id=0, std=0.5).double().train()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 300, (n,), generator=g).tolist() for n in (7, 12, 3, 9, 15, 5)]
    rows = [[(seqs[i], seqs[i + 3])] for i in range(3)]  # pairs of unequal lengths: both sides get padding
    batch = dataloader.collate_pairs(rows, pad_id=0)
    assert batch["input_ids"].shape == (6, 15) and batch["attention_mask"].sum() == sum(map(len, seqs))

    rm.zero_grad()
    loss_sum, right = train_sft.pair_loss_sum(rm, batch)
    (loss_sum / 3).backward()
    got = [p.grad.clone() for p in rm.parameters()]

    rm.zero_grad()
    r = [rm(torch.tensor(s)[None])[0] for s in seqs]
    margins = torch.stack([r[i] - r[i + 3] for i in range(3)])
    direct = -torch.log(torch.sigmoid(margins)).mean()
    direct.backward()
    assert margins.abs().max() > 0.05  # a real check only if the scores differ
    torch.testing.assert_close(loss_sum / 3, direct, rtol=1e-10, atol=1e-12)
    assert int(right) == int((margins > 0).sum())
    for a, b in zip(got, (p.grad for p in rm.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert got[-1].abs().sum() > 0  # the score head learns


def test_loss_is_stable_for_huge_margins():
    scores = torch.tensor([200.0, -200.0, 0.0, 0.0], requires_grad=True)  # pair 1: +200, pair 2: -200
    batch = {"input_ids": None, "attention_mask": None}
    loss, right = train_sft.pair_loss_sum(lambda ids, attention_mask: scores, batch)
    loss.backward()
    assert loss.item() == pytest.approx(200.0) and int(right) == 1 and torch.isfinite(scores.grad).all()


# -----------------------------------------------------------------------------
# pair rows


def test_pair_layouts_give_the_same_sequences(ckpt):
    tok = Tokenizer.from_pretrained(ckpt)
    got = [dataloader.row_to_example(_pair(3, 4, s), tok, "rm", "x:1") for s in ("prompt", "messages", "conversation")]
    assert got[0] == got[1] == got[2]
    chosen, rejected = got[0]
    conv = [{"role": "user", "content": "What is 3+4?"}, {"role": "assistant", "content": "yes, 7"}]
    assert chosen == tok.encode_chat_with_mask(conv)[0] and chosen != rejected


def test_bad_pair_rows_name_file_and_line(tmp_path, ckpt):
    tok = Tokenizer.from_pretrained(ckpt)
    good = json.dumps(_pair(1, 2, "prompt"))
    cases = {
        "no_rejected": ([good, json.dumps({"prompt": "q", "chosen": "yes"})], ":2: pair row missing 'rejected'"),
        "no_chosen": ([json.dumps({"prompt": "q", "rejected": "no"})], ":1: pair row missing 'chosen'"),
        "no_context": ([good, good, json.dumps({"chosen": "yes", "rejected": "no"})], ":3: 'chosen' is a string but"),
        "not_assistant": ([json.dumps({"chosen": [{"role": "user", "content": "q"}], "rejected": "no", "prompt": "q"})],
                          ":1: 'chosen' does not end in a non-empty assistant turn"),
    }
    for name, (lines, msg) in cases.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", lines)
        with pytest.raises(ValueError, match=f"{name}.jsonl{msg}"):
            dataloader.load_examples([path], tok, **_data(_cfg()))
    path = write_jsonl(tmp_path / "mixed.jsonl", [good, json.dumps({"prompt": "q", "chosen": "yes"}), good])
    (examples,), stats = dataloader.load_examples([path], tok, **_data(_cfg(skip_bad_rows=1)), log=lambda *a: None)
    assert len(examples) == 2 and stats["skipped"] == 1
    too_long = json.dumps({"prompt": "q", "chosen": "7 " * 40, "rejected": "no"})
    long = write_jsonl(tmp_path / "long.jsonl", [good, too_long])
    logs = []
    (examples,), stats = dataloader.load_examples([long], tok, **_data(_cfg(max_seq_len=48)), log=logs.append)
    assert len(examples) == 1 and stats["dropped"] == 1 and any("long.jsonl:2" in line for line in logs)


# -----------------------------------------------------------------------------
# end to end


def test_rm_learns_a_separable_preference(tmp_path, ckpt, pairs):
    """From the causal LM (fresh head): >= 95% held-out pairwise accuracy; logged, saved as a Qwen2 seq-cls RM."""
    out = str(tmp_path / "rm")
    res = _run(ckpt, pairs, out, max_steps=15, eval_every=5)
    assert res["eval_pair_acc"] >= 0.95, res
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert {"pair_acc", "pairs", "loss"} <= recs[0].keys() and recs[-1]["eval_pair_acc"] == res["eval_pair_acc"]
    assert recs[0]["pairs"] == 8 and recs[-1]["loss"] < recs[0]["loss"]
    conf = json.load(open(os.path.join(out, "ckpt", "config.json")))
    assert conf["architectures"] == ["Qwen2ForSequenceClassification"]
    # the saved RM scores held-out-style pairs the right way round
    rm = RewardModel.from_pretrained(os.path.join(out, "ckpt")).eval()
    tok = Tokenizer.from_pretrained(os.path.join(out, "ckpt"))
    with torch.no_grad():
        for a, b in ((13, 2), (20, 7)):
            c, r = dataloader.row_to_example(_pair(a, b, "prompt"), tok, "rm", "x:1")
            assert rm(torch.tensor([c]))[0] > rm(torch.tensor([r]))[0]


def test_init_detects_reward_model_or_causal_lm(tmp_path, ckpt, pairs):
    """--init_from a causal LM: its body + a fresh head; --init_from a reward model: that model, head included
    (lr 0: the saved weights are exactly the initial ones)."""
    lm = load_file(os.path.join(ckpt, "model.safetensors"))
    _run(ckpt, pairs, str(tmp_path / "a"), lr=0, min_lr=0, max_steps=1, eval_frac=0)
    a = load_file(str(tmp_path / "a" / "ckpt" / "model.safetensors"))
    assert a.keys() == {k for k in lm if k.startswith("model.")} | {"score.weight"}
    assert all(torch.equal(a[k], lm[k]) for k in a if k != "score.weight")
    a["score.weight"] = a["score.weight"] + 1.0  # a head no fresh init would draw
    rm_dir = tmp_path / "a" / "ckpt"
    save_file(a, str(rm_dir / "model.safetensors"))
    assert model.is_reward_model_dir(str(rm_dir)) and not model.is_reward_model_dir(ckpt)
    _run(str(rm_dir), pairs, str(tmp_path / "b"), lr=0, min_lr=0, max_steps=1, eval_frac=0)
    b = load_file(str(tmp_path / "b" / "ckpt" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rm_kill_and_resume_reaches_the_same_parameters(tmp_path, ckpt, pairs):
    full = _run(ckpt, pairs, str(tmp_path / "full"), save_every=3)
    crashed = _run(ckpt, pairs, str(tmp_path / "resumed"), save_every=3, stop_after=4)
    assert crashed["step"] == 4
    resumed = _run(ckpt, pairs, str(tmp_path / "resumed"), save_every=3, resume=1)
    assert resumed["step"] == 6
    a = load_file(str(tmp_path / "full" / "ckpt" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "ckpt" / "model.safetensors"))
    assert a.keys() == b.keys() and "score.weight" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full["eval_loss"] == resumed["eval_loss"] and full["eval_pair_acc"] == resumed["eval_pair_acc"]


def test_rm_grad_accum_and_ddp_two_ranks_equal_one_process(tmp_path, ckpt, pairs):
    """torchrun --nproc_per_node=2 (gloo) x grad_accum 2 x batch 2 == one process x batch 8: the pair-count
    normalisation makes the gradient independent of the split. In fp64, where the other summation order moves the
    AdamW steps by ~1e-15 (in fp32 by up to lr on a near-zero gradient)."""
    common = dict(mode="rm", init_from=ckpt, data=pairs, max_seq_len=64, max_steps=3, lr=3e-3, warmup_steps=1,
                  eval_frac=0.2, eval_every=3, progress=0, dtype="float64")
    ddp_out = str(tmp_path / "ddp")
    args = [f"--{k}={v}" for k, v in {**common, "out_dir": ddp_out, "batch_size": 2, "grad_accum": 2}.items()]
    assert "world 2" in torchrun("train_sft.py", args)
    single = train_sft.main([f"--{k}={v}" for k, v in {**common, "out_dir": str(tmp_path / "one"),
                                                        "batch_size": 8}.items()])
    a = load_file(os.path.join(ddp_out, "ckpt", "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "ckpt" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-10)
    last = [json.loads(line) for line in open(os.path.join(ddp_out, "metrics.jsonl"))][-1]
    assert last["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-4)
    assert last["eval_pair_acc"] == pytest.approx(single["eval_pair_acc"])
