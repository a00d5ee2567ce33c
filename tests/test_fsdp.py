"""--fsdp=1 (FSDP2 fully_shard, torchrun --nproc_per_node=2, gloo on the CPU) against the DDP run: train_sft.py and
train_grpo.py reach the same parameters through a kill and --resume=1, and write ordinary HF-layout checkpoints."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import train_sft
from helpers import make_tiny_checkpoint, torchrun
from model import ModelConfig, Transformer
from train_common import shard_model
from test_grpo import _max_diff
from test_grpo import data as grpo_data  # noqa: F401 (fixtures)
from test_sft import ckpt, sft_data  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torchrun(script, **args):
    """script under torchrun with 2 ranks (gloo, one thread each); -> its stdout."""
    return torchrun(script, [f"--{k}={v}" for k, v in args.items()])


def _ddp_and_fsdp(script, base, common):
    """The DDP run straight through, and the FSDP run killed after step 3 (past its checkpoint at 2), then resumed:
    the same parameters at the end, in fp64 (in fp32 the two ways of summing differ by an amount that depends on the
    CPU's kernels, and AdamW makes it up to lr). -> (ddp out_dir, fsdp out_dir, metrics of each)."""
    common = {**common, "dtype": "float64"}
    ddp, fsdp = str(base / "ddp"), str(base / "fsdp")
    _torchrun(script, **common, out_dir=ddp)
    assert "FSDP2-sharded" in _torchrun(script, **common, out_dir=fsdp, fsdp=1, stop_after=3)
    assert "resumed from" in _torchrun(script, **common, out_dir=fsdp, fsdp=1, resume=1)
    diff = _max_diff(_check_checkpoint(fsdp, common["init_from"], 2),
                     load_file(os.path.join(ddp, "ckpt", "model.safetensors")))
    print(f"{script} FSDP vs DDP: max |dparam| {diff:.2e}")
    assert diff <= 1e-10
    metrics = [[json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))] for d in (ddp, fsdp)]
    assert [m["step"] for m in metrics[1]] == [1, 2, 3, 4]
    return ddp, fsdp, *metrics


def _check_checkpoint(out, init, world):
    """The sharded run's checkpoint: HF files that load (same tensors), a full name-keyed optimizer state."""
    ck = os.path.join(out, "ckpt")
    params = load_file(os.path.join(ck, "model.safetensors"))
    model = Transformer.from_pretrained(ck)
    for k, v in model.state_dict().items():
        assert torch.equal(v, params.get(k, params["model.embed_tokens.weight"])), k  # (lm_head is tied)
    assert _max_diff(params, load_file(os.path.join(init, "model.safetensors"))) > 1e-3  # it trained
    state = torch.load(os.path.join(ck, "trainer_state.pt"), weights_only=False)
    assert state["fsdp"] and state["world_size"] == world and state["step"] == 4
    moments = state["optimizer"]["state"]["model.embed_tokens.weight"]["exp_avg"]
    assert moments.shape == params["model.embed_tokens.weight"].shape  # gathered whole, not one rank's shard
    return params


def test_sft_fsdp_equals_ddp(ckpt, sft_data, tmp_path):  # noqa: F811
    """4 steps with grad_accum=2 (set_requires_gradient_sync), clipping, and an eval whose row count is uneven
    over the ranks (5 rows: a padding batch on rank 1)."""
    common = dict(init_from=ckpt, data=sft_data, max_seq_len=96, max_steps=4, lr=3e-3, warmup_steps=1, pack=0,
                  batch_size=2, grad_accum=2, grad_clip=0.5, eval_frac=0.1, eval_max_examples=5, eval_every=2,
                  save_every=2, progress=0, log_every=1)
    ddp, fsdp, m_ddp, m_fsdp = _ddp_and_fsdp("train_sft.py", tmp_path, common)
    for x, y in zip(m_ddp, m_fsdp):
        for k in ("loss", "grad_norm", "eval_loss"):
            assert (k in x) == (k in y) and x.get(k, 0) == pytest.approx(y.get(k, 0), rel=1e-4), k
    # the optimizer states are laid out differently: resuming across the flag is refused, not misread
    with pytest.raises(SystemExit, match="saved with --fsdp=1"):
        train_sft.main([f"--{k}={v}" for k, v in {**common, "out_dir": fsdp, "resume": 1}.items()])


def test_grpo_fsdp_equals_ddp(grpo_data, tmp_path):  # noqa: F811
    """4 steps of minibatches=2 x ppo_epochs=2 (recomputed pi_old) on 3 x 3 rollouts, packed by a token budget
    of 1 (every rollout a micro-batch of its own): the ranks run different numbers of rollouts (9 of them, fewer once
    zero-advantage ones are skipped), so FSDP's padding passes run. A bias-free Qwen3-style model, as in test_grpo's
    DDP test."""
    init = make_tiny_checkpoint(str(tmp_path / "init"), std=0.1, model_type="qwen3", attention_bias=False,
                                qk_norm=True, head_dim=16)
    common = dict(init_from=init, data=grpo_data[0], eval_every=0, max_steps=4, group_size=3, prompts_per_step=3,
                  max_completion_len=16, progress=0, sample_every=0, warmup_steps=1, lr=1e-3, rewards="language:1",
                  minibatches=2, ppo_epochs=2, micro_batch_tokens=1, save_every=2)
    ddp, fsdp, m_ddp, m_fsdp = _ddp_and_fsdp("train_grpo.py", tmp_path, common)
    assert sum(m["trained_rollouts"] for m in m_fsdp) > 0
    for x, y in zip(m_ddp, m_fsdp):  # the same rollouts (sampled from the gathered weights) and the same update
        for k in ("reward", "completion_len", "trained_rollouts", "entropy"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), k
        for k in ("clip_frac", "kl", "loss", "grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-3, abs=1e-5), k
        assert y["logp_mismatch"] < 1e-4  # the sampler copy holds the policy's weights
    from transformers import Qwen3ForCausalLM

    hf = Qwen3ForCausalLM.from_pretrained(os.path.join(fsdp, "ckpt")).float().eval()  # (stored fp64)
    ours = Transformer.from_pretrained(os.path.join(fsdp, "ckpt"), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_fsdp_needs_torchrun():
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, dtype="float32"))
    with pytest.raises(SystemExit, match="torchrun"):
        shard_model(model)
