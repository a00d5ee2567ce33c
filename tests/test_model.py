"""model.py against transformers' Qwen2/Qwen3 on random checkpoints the tests write themselves."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from helpers import corrupt_safetensors, tiny_hf_checkpoint
from model import ModelConfig, Transformer, load_config
from engine import KVCache
from losses import chunked_cross_entropy, chunked_token_logprobs

pytest.importorskip("transformers")

# (name, model_type, overrides): tied/untied, GQA ratios 1/2/7, q/k/v bias always on for Qwen2
CONFIGS = [
    ("tied-gqa2", "qwen2", dict(tie_word_embeddings=True)),
    ("untied-gqa2", "qwen2", dict(tie_word_embeddings=False)),
    ("mha-gqa1", "qwen2", dict(num_key_value_heads=4)),
    ("gqa7", "qwen2", dict(hidden_size=112, num_attention_heads=7, num_key_value_heads=1)),
    ("deep-theta1e4", "qwen2", dict(num_hidden_layers=4, rope_theta=10000.0, tie_word_embeddings=False)),
    ("qwen3", "qwen3", dict(num_key_value_heads=2, head_dim=32)),
]


def _ids(B=3, T=19, vocab=320, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,model_type,overrides", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_logit_parity_fp32(tmp_path, name, model_type, overrides):
    hf = tiny_hf_checkpoint(tmp_path, model_type, **overrides)
    ours = Transformer.from_pretrained(tmp_path).eval()
    assert hf.config.hidden_size and hf.model.layers[0].self_attn.q_proj.bias is not None or model_type == "qwen3"
    x = _ids()
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x)
    assert got.shape == ref.shape == (3, 19, 320)
    assert ref.abs().max() > 1.0  # the check means something only if logits are not ~0
    assert (got - ref).abs().max().item() <= 1e-4


def test_logit_parity_with_padding_mask(tmp_path):
    hf = tiny_hf_checkpoint(tmp_path)
    ours = Transformer.from_pretrained(tmp_path).eval()
    x = _ids(B=4, T=12)
    mask = torch.ones_like(x)
    mask[0, :5] = 0  # left padding, as the sampler batches prompts
    mask[2, :1] = 0
    with torch.no_grad():
        ref, got = hf(x, attention_mask=mask).logits, ours(x, attention_mask=mask)
    keep = mask.bool()
    assert (got - ref)[keep].abs().max().item() <= 1e-4
    assert torch.isfinite(got).all()  # fully padded query rows must not produce NaN


def test_logit_parity_bf16(tmp_path):
    """bf16 weights and activations in both: stated tolerance 2% of the logit range (bf16 has 8 bits of
    mantissa and the two implementations round intermediate sums at different points)."""
    hf = tiny_hf_checkpoint(tmp_path, dtype=torch.bfloat16)
    ours = Transformer.from_pretrained(tmp_path).eval()
    assert ours.lm_head.weight.dtype == torch.bfloat16
    x = _ids()
    with torch.no_grad():
        ref, got = hf(x).logits.float(), ours(x).float()
    tol = 0.02 * ref.abs().max().item()
    assert (got - ref).abs().max().item() <= tol
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


def test_dtype_and_device_arguments(tmp_path):
    tiny_hf_checkpoint(tmp_path)
    m = Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert all(p.device.type == "cpu" for p in m.parameters())
    assert not any(p.is_meta for p in m.parameters())
    m.to(torch.bfloat16)  # RoPE frequencies stay fp32 whatever the parameter dtype
    assert m.rope_inv_freq(torch.device("cpu")).dtype == torch.float32


def test_tied_checkpoint_has_no_lm_head_and_stays_tied(tmp_path):
    from safetensors import safe_open

    tiny_hf_checkpoint(tmp_path, tie_word_embeddings=True)
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    m = Transformer.from_pretrained(tmp_path)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert m.num_params() == sum(p.numel() for p in set(m.parameters()))


def test_save_load_round_trip_bit_exact(tmp_path):
    tiny_hf_checkpoint(tmp_path / "src", tie_word_embeddings=False)
    a = Transformer.from_pretrained(tmp_path / "src")
    a.save_pretrained(tmp_path / "dst")
    b = Transformer.from_pretrained(tmp_path / "dst")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert not os.path.exists(str(tmp_path / "dst") + ".tmp")


@pytest.mark.parametrize("model_type,tied", [("qwen2", True), ("qwen2", False), ("qwen3", True)])
def test_saved_checkpoint_loads_in_transformers(tmp_path, model_type, tied):
    from transformers import AutoModelForCausalLM

    hf = tiny_hf_checkpoint(tmp_path / "src", model_type, tie_word_embeddings=tied)
    Transformer.from_pretrained(tmp_path / "src").save_pretrained(tmp_path / "dst")
    hf2 = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    x = _ids()
    with torch.no_grad():
        assert torch.equal(hf(x).logits, hf2(x).logits)
    for k, v in hf.state_dict().items():
        assert torch.equal(v, hf2.state_dict()[k]), k


def test_sharded_save_and_load(tmp_path):
    tiny_hf_checkpoint(tmp_path / "src", tie_word_embeddings=False)
    a = Transformer.from_pretrained(tmp_path / "src")
    a.save_pretrained(tmp_path / "dst", max_shard_size=40_000)
    files = sorted(os.listdir(tmp_path / "dst"))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    b = Transformer.from_pretrained(tmp_path / "dst")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_loads_transformers_sharded_checkpoint(tmp_path):
    hf = tiny_hf_checkpoint(tmp_path, max_shard_size="50KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    ours = Transformer.from_pretrained(tmp_path).eval()
    x = _ids()
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max() <= 1e-4


def test_config_forms_published_and_transformers5(tmp_path):
    base = dict(model_type="qwen2", vocab_size=320, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    for extra in (dict(rope_theta=12345.0, torch_dtype="bfloat16"),
                  dict(rope_parameters={"rope_theta": 12345.0, "rope_type": "default"}, dtype="bfloat16")):
        with open(tmp_path / "config.json", "w") as f:
            json.dump({**base, **extra}, f)
        c = load_config(tmp_path)
        assert c.rope_theta == 12345.0 and c.dtype == "bfloat16" and c.head_dim == 16
    assert "rope_parameters" not in c.to_hf() and c.to_hf()["rope_theta"] == 12345.0


# ---- bad input: each error names the file and the key ------------------------------------------


def _corrupt(tmp_path, fn):
    tiny_hf_checkpoint(tmp_path)
    return corrupt_safetensors(os.path.join(tmp_path, "model.safetensors"), fn)


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(tmp_path)


def test_invalid_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json: invalid JSON"):
        Transformer.from_pretrained(tmp_path)


def test_unknown_model_type(tmp_path):
    tiny_hf_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: model_type='llama' is not supported"):
        Transformer.from_pretrained(tmp_path)


def test_missing_weights_file(tmp_path):
    tiny_hf_checkpoint(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Transformer.from_pretrained(tmp_path)


def test_missing_tensor_is_an_error_not_random_init(tmp_path):
    p = _corrupt(tmp_path, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(KeyError, match=r"model\.safetensors.*missing tensors.*layers\.1\.mlp\.up_proj\.weight"):
        Transformer.from_pretrained(tmp_path)
    assert os.path.exists(p)


def test_extra_tensor(tmp_path):
    _corrupt(tmp_path, lambda s: s.__setitem__("model.layers.9.foo.weight", torch.zeros(2)))
    with pytest.raises(KeyError, match=r"model\.safetensors.*unexpected tensors.*layers\.9\.foo\.weight"):
        Transformer.from_pretrained(tmp_path)


def test_misshaped_tensor(tmp_path):
    _corrupt(tmp_path, lambda s: s.__setitem__("model.norm.weight", torch.ones(63)))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor model\.norm\.weight has shape \[63\], expected \[64\]"):
        Transformer.from_pretrained(tmp_path)


def test_missing_shard(tmp_path):
    tiny_hf_checkpoint(tmp_path, max_shard_size="50KB")
    shard = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]["model.norm.weight"]
    os.remove(tmp_path / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        Transformer.from_pretrained(tmp_path)


def test_unsupported_rope_scaling(tmp_path):
    tiny_hf_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="yarn"):
        Transformer.from_pretrained(tmp_path)


# ---- KV cache, losses, checkpointing ------------------------------------------------------------


def test_kv_cache_prefill_then_decode_equals_full_forward(tmp_path):
    tiny_hf_checkpoint(tmp_path)
    m = Transformer.from_pretrained(tmp_path).eval()
    x = _ids(B=2, T=16)
    pad = torch.ones_like(x)
    pad[1, :4] = 0  # row 1 is a 12-token prompt left-padded to 16
    with torch.no_grad():
        full = m(x, attention_mask=pad)
        cache = KVCache(m.config, batch_size=2, max_seq_len=32)
        out = [m(x[:, :10], attention_mask=pad[:, :10], kv_cache=cache)]
        for t in range(10, 16):
            out.append(m(x[:, t:t + 1], kv_cache=cache))
    step = torch.cat(out, dim=1)
    keep = pad.bool()
    assert (step - full)[keep].abs().max() <= 1e-4
    # padding invariance: row 1 alone, unpadded, gives the same logits
    with torch.no_grad():
        alone = m(x[1:, 4:])
    assert (alone[0] - full[1, 4:]).abs().max() <= 1e-4


def test_kv_cache_select_fans_out_rows(tmp_path):
    tiny_hf_checkpoint(tmp_path)
    m = Transformer.from_pretrained(tmp_path).eval()
    x = _ids(B=1, T=8)
    with torch.no_grad():
        cache = KVCache(m.config, 1, 16)
        m(x, kv_cache=cache)
        cache.select(torch.tensor([0, 0, 0]))
        nxt = torch.tensor([[1], [2], [3]])
        fanned = m(nxt, kv_cache=cache)[:, -1]
        ref = m(torch.cat([x.expand(3, -1), nxt], dim=1))[:, -1]
    assert (fanned - ref).abs().max() <= 1e-4


def test_chunked_cross_entropy_matches_full_logits():
    torch.manual_seed(0)
    N, D, V = 37, 16, 1000
    h = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (N,))
    y[::5] = -100
    for reduction in ("mean", "sum"):
        ref = F.cross_entropy(h @ w.t(), y, ignore_index=-100, reduction=reduction)
        gh_ref, gw_ref = torch.autograd.grad(ref, (h, w))
        got = chunked_cross_entropy(h, w, y, chunk_size=8, reduction=reduction)
        gh, gw = torch.autograd.grad(got, (h, w))
        assert torch.allclose(got, ref, rtol=1e-10)
        assert torch.allclose(gh, gh_ref, rtol=1e-8, atol=1e-12)
        assert torch.allclose(gw, gw_ref, rtol=1e-8, atol=1e-12)


def test_chunked_cross_entropy_fp32_and_scaled_upstream_grad():
    torch.manual_seed(0)
    h = torch.randn(2, 9, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    y = torch.randint(0, 50, (2, 9))
    ref = 3.0 * F.cross_entropy((h @ w.t()).view(-1, 50), y.view(-1))
    got = 3.0 * chunked_cross_entropy(h, w, y, chunk_size=4)
    g_ref, g = torch.autograd.grad(ref, (h, w)), torch.autograd.grad(got, (h, w))
    assert torch.allclose(got, ref, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g, g_ref))
    with torch.no_grad():  # no gradient work in eval
        assert torch.allclose(chunked_cross_entropy(h, w, y), ref / 3.0, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_chunked_token_logprobs_match_log_softmax_with_any_upstream_grad(temperature):
    torch.manual_seed(0)
    h = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 40, (3, 7))
    adv = torch.randn(3, 7, dtype=torch.float64)  # GRPO-like per-token weights
    ref = torch.log_softmax(h @ w.t() / temperature, -1).gather(-1, y[..., None]).squeeze(-1)
    got = chunked_token_logprobs(h, w, y, chunk_size=5, temperature=temperature)
    assert got.shape == y.shape and torch.allclose(got.double(), ref, rtol=1e-6)
    g_ref = torch.autograd.grad((ref * adv).sum(), (h, w))
    g = torch.autograd.grad((got * adv).sum(), (h, w))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(g, g_ref))


def test_training_loss_via_hidden_matches_full_logits_and_checkpointing(tmp_path):
    tiny_hf_checkpoint(tmp_path, tie_word_embeddings=False)
    m = Transformer.from_pretrained(tmp_path).train()
    x = _ids(B=2, T=12)
    loss_full = F.cross_entropy(m(x)[:, :-1].reshape(-1, 320), x[:, 1:].reshape(-1))
    g_full = torch.autograd.grad(loss_full, list(m.parameters()))
    m.gradient_checkpointing = True
    h = m(x, return_hidden=True)[:, :-1]
    loss = chunked_cross_entropy(h, m.lm_head.weight, x[:, 1:], chunk_size=7)
    g = torch.autograd.grad(loss, list(m.parameters()))
    assert torch.allclose(loss, loss_full, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g, g_full))


def test_scratch_init_and_flops():
    cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    m = Transformer(cfg).init_weights()
    assert m(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, 128)
    assert m.flops_per_token(256) > 6 * m.num_params() - 6 * 128 * 32


def test_chunked_token_logprobs_bf16_inputs_give_fp32_logprobs_of_the_bf16_logits():
    torch.manual_seed(0)
    h = torch.randn(9, 16).bfloat16().requires_grad_()
    w = torch.randn(50, 16).bfloat16().requires_grad_()
    y = torch.randint(0, 50, (9,))
    got = chunked_token_logprobs(h, w, y, chunk_size=4)
    ref = torch.log_softmax((h @ w.t()).float(), -1).gather(-1, y[:, None])[:, 0]
    assert got.dtype == torch.float32 and torch.allclose(got, ref, atol=1e-5)
    gh, gw = torch.autograd.grad(got.sum(), (h, w))
    rh, rw = torch.autograd.grad(ref.sum(), (h, w))
    assert gh.dtype == torch.bfloat16 and torch.allclose(gh.float(), rh.float(), atol=2e-2)
    assert torch.allclose(gw.float(), rw.float(), atol=2e-2)
