"""model.RewardModel against transformers' Qwen2ForSequenceClassification on random checkpoints written here."""
import json
import os

import pytest
import torch

from helpers import corrupt_safetensors, tiny_hf_checkpoint
from model import RewardModel, Transformer

pytest.importorskip("transformers")

PAD = 0  # the pad id: never drawn inside a sequence, so transformers (which looks for it) and the mask agree
VOCAB = 320


def tiny_hf_rm(path, model_type="qwen2", seed=0, **overrides):
    """Write a random transformers Qwen2/Qwen3ForSequenceClassification (num_labels 1, pad_token_id PAD) to
    `path`; returns it in eval mode. Larger-than-default weights so the scores are not all ~0."""
    return tiny_hf_checkpoint(path, model_type, seed, head="seq_cls", num_labels=1, pad_token_id=PAD, **overrides)


def batch(padding, B=4, T=13, seed=1):
    """ids [B, T] drawn from 1..VOCAB-1 and a 0/1 mask; padded rows get PAD on the padded side."""
    ids = torch.randint(1, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if padding != "none":
        for row, n_pad in enumerate([0, 5, 1, 9][:B]):
            if padding == "right":
                mask[row, T - n_pad:] = 0
            else:
                mask[row, :n_pad] = 0
    return ids.masked_fill(mask == 0, PAD), mask


PADDINGS = ["none", "right", "left"]


@pytest.mark.parametrize("padding", PADDINGS)
def test_score_parity_with_transformers(tmp_path, padding):
    """transformers writes, we load: same scores (fp32, 1e-4), and each padded row scores as it does alone."""
    hf = tiny_hf_rm(tmp_path)
    rm = RewardModel.from_pretrained(tmp_path).eval()
    assert rm.num_labels == 1 and rm.pad_token_id == PAD
    ids, mask = batch(padding)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits  # [B, 1]
        got = rm(ids, attention_mask=mask)
    assert ref.shape == (4, 1) and got.shape == (4,)
    assert ref.abs().max() > 0.1  # the check means something only if scores are not ~0
    assert (got - ref[:, 0]).abs().max().item() <= 1e-4
    with torch.no_grad():
        alone = torch.stack([rm(ids[b][mask[b].bool()][None])[0] for b in range(len(ids))])
    assert (got - alone).abs().max().item() <= 1e-4


def test_score_parity_qwen3(tmp_path):
    hf = tiny_hf_rm(tmp_path, "qwen3", head_dim=32)
    rm = RewardModel.from_pretrained(tmp_path).eval()
    ids, mask = batch("left")
    with torch.no_grad():
        assert (rm(ids, attention_mask=mask) - hf(ids, attention_mask=mask).logits[:, 0]).abs().max() <= 1e-4


def test_saved_reward_model_loads_in_transformers(tmp_path):
    """We write (from a transformers checkpoint loaded with ours), transformers loads it as
    Qwen2ForSequenceClassification with the same tensors and scores every padding the same as ours."""
    from transformers import AutoModelForSequenceClassification, Qwen2ForSequenceClassification

    src = tiny_hf_rm(tmp_path / "src", tie_word_embeddings=False)
    rm = RewardModel.from_pretrained(tmp_path / "src").eval()
    rm.save_pretrained(tmp_path / "dst")
    cfg = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForSequenceClassification"] and cfg["pad_token_id"] == PAD
    assert cfg["id2label"] == {"0": "LABEL_0"} and cfg["label2id"] == {"LABEL_0": 0}
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "dst").eval()
    assert type(hf) is Qwen2ForSequenceClassification and hf.config.num_labels == 1
    assert hf.state_dict().keys() == src.state_dict().keys()
    for k, v in src.state_dict().items():
        assert torch.equal(v, hf.state_dict()[k]), k
    for padding in PADDINGS:
        ids, mask = batch(padding, seed=2)
        with torch.no_grad():
            assert (rm(ids, attention_mask=mask) - hf(ids, attention_mask=mask).logits[:, 0]).abs().max() <= 1e-4


def test_save_load_round_trip_bit_exact_and_sharded(tmp_path):
    tiny_hf_rm(tmp_path / "src")
    a = RewardModel.from_pretrained(tmp_path / "src")
    for name, kw in (("single", {}), ("sharded", dict(max_shard_size=40_000))):
        a.save_pretrained(tmp_path / name, **kw)
        assert not os.path.exists(str(tmp_path / name) + ".tmp")
        assert os.path.exists(tmp_path / name / "model.safetensors.index.json") == (name == "sharded")
        b = RewardModel.from_pretrained(tmp_path / name)
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and "score.weight" in sa and not any(k.startswith("lm_head") for k in sa)
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
        assert b.pad_token_id == PAD and b.num_labels == 1


def test_no_mask_scores_the_last_position_and_dtype_argument(tmp_path):
    tiny_hf_rm(tmp_path)
    rm = RewardModel.from_pretrained(tmp_path).eval()
    ids, _ = batch("none")
    with torch.no_grad():
        h = rm.hidden_states(ids)
        assert torch.allclose(rm(ids), rm.score(h[:, -1])[:, 0])
        assert torch.equal(rm(ids), rm(ids, attention_mask=torch.ones_like(ids)))
    rm16 = RewardModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in rm16.parameters()} == {torch.bfloat16} and not any(p.is_meta for p in rm16.parameters())
    with pytest.raises(ValueError, match=r"\[B, T\] 0/1 padding mask"):
        rm(ids, attention_mask=torch.ones(4, 1, 13, 13, dtype=torch.bool))


def test_from_causal_lm_shares_the_body(tmp_path):
    """A new RM from a causal LM (untied, so the checkpoint stores lm_head.weight): the body tensors are the LM's,
    its hidden states are the LM's, the head is fresh; saved, it loads back as a reward model."""
    tiny_hf_checkpoint(tmp_path / "lm", tie_word_embeddings=False)
    lm = Transformer.from_pretrained(tmp_path / "lm").eval()
    torch.manual_seed(0)
    rm = RewardModel.from_causal_lm(tmp_path / "lm", pad_token_id=PAD).eval()
    body = {k: v for k, v in lm.state_dict().items() if k.startswith("model.")}
    assert rm.state_dict().keys() == body.keys() | {"score.weight"}
    assert all(torch.equal(v, rm.state_dict()[k]) for k, v in body.items())
    assert rm.score.weight.shape == (1, 64) and 0 < rm.score.weight.std() < 0.05
    ids, mask = batch("left")
    with torch.no_grad():
        assert torch.equal(rm.hidden_states(ids, attention_mask=mask), lm(ids, attention_mask=mask, return_hidden=True))
    rm.save_pretrained(tmp_path / "rm")
    assert torch.equal(RewardModel.from_pretrained(tmp_path / "rm").score.weight, rm.score.weight)


# ---- bad input: errors name the file and the key ----------------------------------------------------------


def test_causal_lm_checkpoint_is_not_a_reward_model(tmp_path):
    tiny_hf_checkpoint(tmp_path, tie_word_embeddings=False)
    with pytest.raises(KeyError, match=r"model\.safetensors: no score\.weight.*looks like a causal LM.*lm_head"):
        RewardModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("tied", [True, False])
def test_reward_model_dir_is_not_a_causal_lm(tmp_path, tied):
    tiny_hf_rm(tmp_path, tie_word_embeddings=tied)
    with pytest.raises(KeyError, match=r"model\.safetensors: unexpected tensor score\.weight.*reward model"):
        Transformer.from_pretrained(tmp_path)


def _corrupt(tmp_path, fn):
    tiny_hf_rm(tmp_path)
    corrupt_safetensors(os.path.join(tmp_path, "model.safetensors"), fn)


@pytest.mark.parametrize("fn,error,match", [
    (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), KeyError,
     r"model\.safetensors.*missing tensors.*layers\.1\.mlp\.up_proj\.weight"),
    (lambda s: s.__setitem__("lm_head.weight", torch.zeros(VOCAB, 64)), KeyError,
     r"model\.safetensors.*unexpected tensors.*lm_head\.weight"),
    (lambda s: s.__setitem__("score.weight", torch.zeros(2, 64)), ValueError,
     r"model\.safetensors: tensor score\.weight has shape \[2, 64\], expected \[1, 64\]"),
], ids=["missing", "unexpected", "misshaped"])
def test_strict_named_key_errors(tmp_path, fn, error, match):
    _corrupt(tmp_path, fn)
    with pytest.raises(error, match=match):
        RewardModel.from_pretrained(tmp_path)


def test_training_gradients_with_and_without_checkpointing(tmp_path):
    """The shared body trains as Transformer's does: gradient checkpointing gives the same gradients."""
    tiny_hf_rm(tmp_path)
    rm = RewardModel.from_pretrained(tmp_path).train()
    ids, mask = batch("right")
    grads = []
    for ckpt in (False, True):
        rm.gradient_checkpointing = ckpt
        score = rm(ids, attention_mask=mask)
        grads.append(torch.autograd.grad((score * torch.tensor([1.0, -1.0, 0.5, 2.0])).sum(), list(rm.parameters())))
    assert all(g is not None for g in grads[0]) and grads[0][-1].abs().sum() > 0  # score.weight gets a gradient
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
