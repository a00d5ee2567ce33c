"""Shared test helpers: small random Qwen2/Qwen3 checkpoints written in HF layout by the tests themselves."""
import torch


def hf_config(model_type="qwen2", **overrides):
    """A tiny transformers config (Qwen2Config / Qwen3Config) with random-checkpoint-friendly defaults."""
    from transformers import Qwen2Config, Qwen3Config

    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
    kw.update(overrides)
    if model_type == "qwen3":
        kw.setdefault("head_dim", 32)
        return Qwen3Config(**kw)
    return Qwen2Config(**kw)


def tiny_hf_checkpoint(path, model_type="qwen2", seed=0, dtype=torch.float32, max_shard_size=None, **overrides):
    """Write a random transformers Qwen2/Qwen3 model to `path` (HF layout); returns the HF model (eval mode).
    Weights are drawn with a larger std than HF's default so logits are not all ~0 (a weak parity check)."""
    from transformers import Qwen2ForCausalLM, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cls = Qwen3ForCausalLM if model_type == "qwen3" else Qwen2ForCausalLM
    model = cls(hf_config(model_type, **overrides)).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kw)
    return model
