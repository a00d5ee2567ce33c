"""
A hand-written Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen (and Qwen3) decoder in plain PyTorch.

Module and parameter names are identical to Hugging Face's keys (`model.layers.0.self_attn.q_proj.weight`,
...), so an HF checkpoint loads with a strict state-dict load and our checkpoints load in transformers/vLLM.

    model = Transformer.from_pretrained("/path/Qwen2.5-1.5B", dtype=torch.bfloat16, device="cuda")
    logits = model(input_ids)                       # [B, T, vocab]
    model.save_pretrained("/path/out")              # config.json + (sharded) safetensors

RewardModel is the same body under a one-score head (Qwen2ForSequenceClassification). Imports nothing of the repo:
the KV cache the sampler decodes with is engine.KVCache (forward takes any object with its prepare/update),
and the losses over the lm_head are in losses.py.
"""
import json
import os
import shutil
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's LoRA adapter files

# -----------------------------------------------------------------------------
# config


@dataclass
class ModelConfig:
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int = 0  # 0 -> hidden_size // num_attention_heads (Qwen2); Qwen3 sets it explicitly
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    attention_bias: bool = True  # bias on q/k/v (Qwen2); Qwen3 has none
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    model_type: str = "qwen2"
    dtype: str = "bfloat16"  # dtype the checkpoint is stored in
    extra: dict = field(default_factory=dict)  # other config.json keys, written back unchanged

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Build from an HF config.json dict (published form or transformers>=5 form)."""
        d = dict(d)
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{source}: model_type={model_type!r} is not supported; "
                             f"expected one of {SUPPORTED_MODEL_TYPES}")
        rope = d.pop("rope_parameters", None) or {}
        rope_scaling = d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or rope_scaling.get("rope_type") or rope_scaling.get("type") or "default"
        if rope_type != "default":
            raise ValueError(f"{source}: rope_type={rope_type!r} is not supported (only plain RoPE)")
        if d.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: hidden_act={act!r} is not supported; expected 'silu'")
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"{source}: missing required keys {missing}")
        kw = dict(
            vocab_size=d.pop("vocab_size"),
            hidden_size=d.pop("hidden_size"),
            intermediate_size=d.pop("intermediate_size"),
            num_hidden_layers=d.pop("num_hidden_layers"),
            num_attention_heads=d.pop("num_attention_heads"),
            head_dim=d.pop("head_dim", None) or 0,
            rms_norm_eps=d.pop("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", d.pop("rope_theta", 10000.0)),
            max_position_embeddings=d.pop("max_position_embeddings", 32768),
            tie_word_embeddings=d.pop("tie_word_embeddings", False),
            model_type=d.pop("model_type"),
            dtype=d.pop("torch_dtype", None) or d.pop("dtype", None) or "float32",
        )
        kw["num_key_value_heads"] = d.pop("num_key_value_heads", None) or kw["num_attention_heads"]
        for k in ("rope_theta", "torch_dtype", "dtype", "hidden_act", "use_sliding_window", "architectures"):
            d.pop(k, None)  # either consumed above or rewritten by to_hf
        if model_type == "qwen3":
            kw["attention_bias"] = d.pop("attention_bias", False)
            kw["qk_norm"] = True
        else:
            kw["attention_bias"] = d.pop("attention_bias", True)
        return cls(**kw, extra=d)

    def to_hf(self) -> dict:
        """The published config.json form, which transformers 4.x and 5.x both read."""
        arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[self.model_type]
        d = {"architectures": [arch], "hidden_act": "silu", "use_sliding_window": False, **self.extra}
        d.update(
            model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta, rope_scaling=None,
            max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings,
            torch_dtype=self.dtype,
        )
        if self.model_type == "qwen3":
            d.update(head_dim=self.head_dim, attention_bias=self.attention_bias)
        elif self.head_dim != self.hidden_size // self.num_attention_heads:
            raise ValueError("Qwen2 derives head_dim from hidden_size; a different head_dim needs model_type=qwen3")
        return d


# -----------------------------------------------------------------------------
# modules (names mirror HF's Qwen2 so state dicts match key for key)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalise in fp32 (fp64 stays fp64), cast back before the weight multiply: the order HF uses, so bf16
        # matches too
        return self.weight * F.rms_norm(x.to(at_least_fp32(x.dtype)), (x.shape[-1],), eps=self.eps).to(x.dtype)


def at_least_fp32(dtype):
    """The dtype to accumulate in: fp32 for bf16/fp16/fp32 tensors, fp64 for fp64 ones (the exactness tests)."""
    return torch.promote_types(dtype, torch.float32)


def rope_cos_sin(position_ids, inv_freq, dtype):
    """cos/sin [B, T, head_dim] for integer positions [B, T]; computed in fp32 then cast (as HF does), in fp64 for an
    fp64 model (from the same fp32 inv_freq)."""
    freqs = position_ids[..., None].to(at_least_fp32(dtype)) * inv_freq  # [B, T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE over the full head_dim. x [B, H, T, D], cos/sin [B, T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv_cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
            if T == 1 and self.n_kv_head != self.n_head:
                # decoding one token: the query heads sharing a KV head become query rows of that one head,
                # so the cache is read once (masked GQA has no fused CUDA kernel; the math fallback would
                # copy K/V n_head/n_kv_head times per layer per step)
                qg = q.reshape(B, self.n_kv_head, self.n_head // self.n_kv_head, self.head_dim)
                y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
                return self.o_proj(y.reshape(B, T, -1))
        # mask None means plain causal attention over T (training without padding): the fast kernel path
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """HF's `Qwen2Model`: the part whose keys start with `model.`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def causal_mask(valid, start=0):
    """Bool attention mask [B, 1, S - start, S] for queries at columns start..S-1 over keys 0..S-1, where
    S = valid.shape[1]: causal, and keys with valid[b, key] False (padding) are ignored. Every query also
    sees itself, so a padded query never has an all-masked softmax (which gives NaN)."""
    keys = torch.arange(valid.shape[1], device=valid.device)
    queries = keys[start:, None]
    mask = (keys[None, :] <= queries)[None] & valid[:, None, :]
    mask |= (keys[None, :] == queries)[None]
    return mask[:, None]


# -----------------------------------------------------------------------------
# the model


class Transformer(nn.Module):
    """Qwen2ForCausalLM. `model(input_ids)` -> logits [B, T, vocab]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self._inv_freq_cache = None

    def rope_inv_freq(self, device):
        """RoPE frequencies in fp32. A plain attribute, not a buffer, so model.to(bfloat16) cannot round them."""
        if self._inv_freq_cache is None or self._inv_freq_cache.device != device:
            d = self.config.head_dim
            exponent = torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d
            self._inv_freq_cache = 1.0 / (self.config.rope_theta ** exponent)
        return self._inv_freq_cache

    def init_weights(self, std=0.02):
        """Random init for training from scratch (N(0, std) linears/embeddings, ones for norms)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std)
        return self

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once by .parameters()

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward+backward), PaLM (arXiv 2204.02311) appendix B: per matmul weight 2 in
        the forward and 2 for its input's gradient, and 2 more for its own gradient only if it trains. So 6N when
        every weight trains; 4N + 6N_adapters for a frozen LoRA base. Plus the attention scores. An untied
        embedding is a lookup, not a matmul."""
        c = self.config
        matmul = [p for name, p in self.named_parameters()
                  if c.tie_word_embeddings or not name.startswith("model.embed_tokens.")]
        n, trained = sum(p.numel() for p in matmul), sum(p.numel() for p in matmul if p.requires_grad)
        return 4 * n + 2 * trained + 6 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len

    def forward(self, input_ids, position_ids=None, attention_mask=None, kv_cache=None,
                logits_to_keep=0, return_hidden=False):
        """
        input_ids [B, T]. attention_mask: [B, T] 0/1 padding mask, or a [B, 1, T, S] bool mask used as is
        (packed sequences). position_ids [B, T]: defaults to arange, or to the count of earlier real tokens
        when a padding mask / cache is given. kv_cache: a KVCache; the new tokens are appended to it.
        logits_to_keep=k>0 returns only the last k positions' logits (prefill needs just the last one).
        return_hidden=True returns the final-normed hidden states instead of logits, for chunked losses.
        """
        x = self.hidden_states(input_ids, position_ids, attention_mask, kv_cache)
        if return_hidden:
            return x
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(x)

    def hidden_states(self, input_ids, position_ids=None, attention_mask=None, kv_cache=None):
        """The body, HF's Qwen2Model forward (embeddings, layers, final norm) -> [B, T, hidden]; arguments as in
        forward. RewardModel runs this same method under its own score head."""
        B, T = input_ids.shape
        mask = None
        if kv_cache is not None:
            am = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            cache_pos, mask = kv_cache.prepare(am)
            position_ids = cache_pos if position_ids is None else position_ids
        elif attention_mask is not None and attention_mask.dim() == 2:
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            mask = causal_mask(attention_mask.bool())
        elif attention_mask is not None:
            mask = attention_mask
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None].expand(B, T)

        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.rope_inv_freq(x.device), x.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, kv_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache)
        return self.model.norm(x)

    # ---- HF checkpoint I/O ----------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, lora_base=None):
        """Load an HF-layout Qwen2/Qwen3 checkpoint dir (config.json + model.safetensors or a sharded index).
        Built on the meta device, then each tensor is read straight to `device` in `dtype` (no double memory).
        dtype=None keeps the checkpoint's stored dtype. A LoRA adapter dir (PEFT's adapter_config.json +
        adapter_model.safetensors) gives its base (lora_base, else the one it names) with the adapter merged in."""
        if is_adapter_dir(path):
            return merged_adapter(cls, path, dtype, device, lora_base)
        config = load_config(path)
        for f, keys in _weight_files(path).items():
            if "score.weight" in keys:
                raise KeyError(f"{f}: unexpected tensor score.weight: this is a reward model "
                               f"(Qwen2ForSequenceClassification), not a causal LM; load it with RewardModel")
        tied = config.tie_word_embeddings
        model, state = _load(lambda: cls(config), path, dtype, device, ("lm_head.weight",) if tied else (), tied)
        if tied:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight  # assign=True broke the tie; restore it
        if dtype is None:
            model.config.dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
        return model

    def save_pretrained(self, path, max_shard_size=5 * 1024**3, state_dict=None):
        """Write config.json + safetensors (sharded with an index above max_shard_size bytes) into `path`.
        The directory appears atomically: everything is written to a temp dir that is then renamed.
        state_dict: write these tensors instead of the module's own (the gathered weights of an FSDP-sharded model,
        whose own state_dict holds DTensor shards)."""
        skip = ("lm_head.weight",) if self.config.tie_word_embeddings else ()  # HF omits the tied head
        _write_checkpoint(path, self, state_dict, self.config.to_hf(), max_shard_size, skip)


def swap_in_dir(tmp, path):
    """Swap a finished temp dir into place so readers never see a half-written checkpoint
    (a crash leaves the previous directory, or this one at path.old / path, never a mix)."""
    old = path + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_config(path) -> ModelConfig:
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: no config.json (expected an HF-layout checkpoint directory)")
    try:
        with open(cfg_path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: invalid JSON ({e})") from None
    return ModelConfig.from_hf(d, source=cfg_path)


def _weight_files(path):
    """-> {file path: [keys]} for a single-file or sharded checkpoint."""
    from safetensors import safe_open

    index, single = os.path.join(path, INDEX_NAME), os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = {}
        for key, name in weight_map.items():
            files.setdefault(os.path.join(path, name), []).append(key)
        for f in files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{f}: shard listed in {index} is missing")
        return files
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            return {single: list(f.keys())}
    raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME}")


def _load(build, path, dtype, device, skip=(), tied=False):
    """-> (build() on the meta device, its tensors but `skip` read from path's safetensors straight to device in dtype:
    no double memory). tied: a stored lm_head.weight is the embedding's copy, left unread."""
    with torch.device("meta"):
        model = build()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in skip}
    return model, _read_safetensors(_weight_files(path), expected, dtype, torch.device(device or "cpu"), tied)


def _read_safetensors(files, expected, dtype, device, tied):
    """Read every expected tensor, checking names and shapes first; errors name the file and the key."""
    from safetensors import safe_open

    where = {k: f for f, keys in files.items() for k in keys}
    if tied:
        where.pop("lm_head.weight", None)  # some tied checkpoints still store the head; it is the embedding
    missing = sorted(set(expected) - set(where))
    extra = sorted(set(where) - set(expected))
    if missing:
        raise KeyError(f"{', '.join(sorted(set(files)))}: missing tensors {missing[:10]}"
                       f"{' ...' if len(missing) > 10 else ''} (never random-initialised)")
    if extra:
        raise KeyError(f"{', '.join(sorted({where[k] for k in extra}))}: unexpected tensors {extra[:10]}"
                       f"{' ...' if len(extra) > 10 else ''}")
    state = {}
    for f, keys in files.items():
        with safe_open(f, framework="pt", device=str(device)) as fh:
            for k in keys:
                if k not in expected:
                    continue
                shape = tuple(fh.get_slice(k).get_shape())
                if shape != expected[k]:
                    raise ValueError(f"{f}: tensor {k} has shape {list(shape)}, expected {list(expected[k])}")
                t = fh.get_tensor(k)
                state[k] = t if dtype is None else t.to(dtype)
    return state


# -----------------------------------------------------------------------------
# reward model

SEQ_CLS_ARCHITECTURES = {"qwen2": "Qwen2ForSequenceClassification", "qwen3": "Qwen3ForSequenceClassification"}


class RewardModel(nn.Module):
    """Qwen2ForSequenceClassification (Qwen3 too): Transformer's body under `model.` plus a linear head
    `score.weight` [num_labels, hidden] without bias in place of lm_head. `rm(input_ids, attention_mask)` -> [B]
    (num_labels 1): the score at each row's last real token, for right- or left-padded batches.

        rm = RewardModel.from_pretrained("/path/rm", dtype=torch.bfloat16, device="cuda")
        rewards = rm(ids, attention_mask=mask).float()     # [B]
        rm = RewardModel.from_causal_lm("/path/sft_ckpt")  # a new RM: the SFT model's body, a fresh head
        rm.save_pretrained("/path/out")                    # loads in transformers as Qwen2ForSequenceClassification

    config.extra carries the HF keys the head needs: id2label (its length is num_labels) and pad_token_id.
    transformers finds a row's last token as the rightmost id != pad_token_id (it refuses batches > 1 without
    one); we read the attention mask, so the two agree whenever the pad id does not end a real sequence.
    """

    def __init__(self, config: ModelConfig, num_labels=None, pad_token_id=None):
        super().__init__()
        if pad_token_id is not None:
            config = replace(config, extra={**config.extra, "pad_token_id": pad_token_id})
        self.config = config
        self.num_labels = num_labels or _config_num_labels(config)
        self.model = Decoder(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.gradient_checkpointing = False
        self._inv_freq_cache = None

    # The body is Transformer's own code, not a copy: these are its functions, run on this module's Decoder
    # (hidden_states is the whole Qwen2Model forward: masks, positions, RoPE, layers, checkpointing, final norm).
    rope_inv_freq = Transformer.rope_inv_freq
    hidden_states = Transformer.hidden_states
    init_weights = Transformer.init_weights
    num_params = Transformer.num_params

    @property
    def pad_token_id(self):
        return self.config.extra.get("pad_token_id")

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        """input_ids [B, T]; attention_mask [B, T] 0/1 (right or left padding; None: all real, the last position
        is scored) -> [B] (num_labels 1) or [B, num_labels], in the model's dtype. Positions count the real tokens
        before each one, as in Transformer, so a row scores the same however much padding it got (transformers
        numbers a left-padded row from its first pad; RoPE depends only on relative positions, so the scores match)."""
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"RewardModel takes a [B, T] 0/1 padding mask, got shape {list(attention_mask.shape)}")
        x = self.hidden_states(input_ids, position_ids, attention_mask)
        B, T = input_ids.shape
        if attention_mask is None:
            last = torch.full((B,), T - 1, device=x.device)
        else:  # index of the rightmost real token (HF's formula, over the mask instead of the ids)
            last = (torch.arange(T, device=x.device) * attention_mask.to(x.device).long()).argmax(-1)
        scores = self.score(x[torch.arange(B, device=x.device), last])
        return scores[:, 0] if self.num_labels == 1 else scores

    # ---- HF checkpoint I/O ----------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        """Load a Qwen2ForSequenceClassification checkpoint dir, as Transformer.from_pretrained does (meta device,
        every tensor read straight into place, missing/extra/mis-shaped tensors are errors naming file and key)."""
        config = load_config(path)
        shards = _weight_files(path)
        if not any("score.weight" in keys for keys in shards.values()):
            lm = any("lm_head.weight" in keys for keys in shards.values())
            raise KeyError(f"{', '.join(sorted(shards))}: no score.weight, so not a reward model "
                           f"(Qwen2ForSequenceClassification): this looks like a causal LM checkpoint"
                           f"{' (it has lm_head.weight)' if lm else ''}; start a reward model from one with "
                           f"RewardModel.from_causal_lm")
        model, state = _load(lambda: cls(config), path, dtype, device)
        model.load_state_dict(state, strict=True, assign=True)
        if dtype is None:
            model.config.dtype = str(state["score.weight"].dtype).removeprefix("torch.")
        return model

    @classmethod
    def from_causal_lm(cls, path, dtype=None, device=None, num_labels=1, pad_token_id=None, std=0.02):
        """A new reward model from a causal LM checkpoint dir (R1, like InstructGPT, starts its RM from an SFT
        model): the body read as strictly as from_pretrained reads it, lm_head.weight left out, and a score head
        drawn from N(0, std) (transformers' initializer_range) with torch's global RNG."""
        config = load_config(path)
        model, state = _load(lambda: cls(config, num_labels, pad_token_id), path, dtype, device, skip=("score.weight",),
                             tied=True)  # tied=True: skip a stored lm_head
        head_dtype = dtype or state["model.embed_tokens.weight"].dtype
        state["score.weight"] = torch.empty(tuple(model.score.weight.shape), device=device or "cpu",
                                            dtype=head_dtype).normal_(0.0, std)
        model.load_state_dict(state, strict=True, assign=True)
        model.config.dtype = str(head_dtype).removeprefix("torch.")
        return model

    def hf_config(self) -> dict:
        """config.json: the body's keys plus architectures, id2label/label2id (num_labels) and pad_token_id."""
        d = self.config.to_hf()
        d["architectures"] = [SEQ_CLS_ARCHITECTURES[self.config.model_type]]
        d.pop("num_labels", None)  # transformers derives it from id2label
        id2label = d.get("id2label")
        if not isinstance(id2label, dict) or len(id2label) != self.num_labels:
            id2label = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            d.update(id2label=id2label, label2id={v: int(k) for k, v in id2label.items()})
        d.setdefault("pad_token_id", None)
        return d

    def save_pretrained(self, path, max_shard_size=5 * 1024**3, state_dict=None):
        """Write config.json + safetensors into `path`, atomically, sharded above max_shard_size bytes (as
        Transformer.save_pretrained). state_dict: write these tensors instead of the module's own (FSDP)."""
        _write_checkpoint(path, self, state_dict, self.hf_config(), max_shard_size)


def _config_num_labels(config: ModelConfig) -> int:
    """num_labels as transformers reads it: the length of id2label, else num_labels; 1 when neither is given."""
    id2label = config.extra.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    return int(config.extra.get("num_labels") or 1)


def _write_checkpoint(path, module, state_dict, config, max_shard_size, skip=()):
    """config.json (torch_dtype set from the tensors when they share one dtype) + the tensors but `skip` of state_dict
    (None: the module's own) as safetensors, sharded with an index above max_shard_size bytes, written to path.tmp and
    swapped in (swap_in_dir)."""
    from safetensors.torch import save_file

    state_dict = module.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if k not in skip}
    path = os.path.abspath(path)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    dtypes = {v.dtype for v in state.values()}
    if len(dtypes) == 1:
        config = {**config, "torch_dtype": str(dtypes.pop()).removeprefix("torch.")}
    with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    shards, current, size = [], {}, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        with open(os.path.join(tmp, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    swap_in_dir(tmp, path)


def is_adapter_dir(path):
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def is_checkpoint_dir(path):
    """What from_pretrained loads: an HF-layout checkpoint dir, or a LoRA adapter dir (merged into its base)."""
    return os.path.isfile(os.path.join(path, CONFIG_NAME)) or is_adapter_dir(path)


def read_adapter(path, lora_base=None):
    """A PEFT LoRA adapter dir -> (its adapter_config.json as a dict, the base checkpoint dir: lora_base or the
    config's base_model_name_or_path, {module name: (A [r, in], B [out, r])} in the base's naming)."""
    from safetensors.torch import load_file

    conf_path, weights_path = os.path.join(path, ADAPTER_CONFIG), os.path.join(path, ADAPTER_WEIGHTS)
    with open(conf_path) as f:
        conf = json.load(f)
    for key, want in (("peft_type", "LORA"), ("use_rslora", False), ("use_dora", False), ("rank_pattern", {}),
                      ("alpha_pattern", {})):
        if (conf.get(key) or want) != want:
            raise ValueError(f"{conf_path}: {key} is {conf[key]!r}; nanoR1 reads plain LoRA ({key} {want!r})")
    base = lora_base or conf.get("base_model_name_or_path")
    if not base or not os.path.isfile(os.path.join(base, CONFIG_NAME)):
        raise FileNotFoundError(f"{conf_path}: its base model {base!r} is not a checkpoint dir here (no "
                                f"{CONFIG_NAME}); name the base with --lora_base=DIR")
    pairs = {}
    for key, t in load_file(weights_path).items():
        name, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        if not key.startswith("base_model.model.") or part not in ("A.weight", "B.weight"):
            raise KeyError(f"{weights_path}: unexpected tensor {key} (expected base_model.model.<module>.lora_A.weight"
                           " or .lora_B.weight)")
        pairs.setdefault(name, [None, None])[part == "B.weight"] = t
    missing = sorted(n for n, ab in pairs.items() if None in ab)
    if missing:
        raise KeyError(f"{weights_path}: {missing[0]} has only one of lora_A and lora_B")
    return conf, base, {n: tuple(ab) for n, ab in pairs.items()}


def merged_adapter(cls, path, dtype, device, lora_base=None):
    """The base of the adapter at path with W += (lora_alpha / r) B A merged into each adapted linear (in fp32 or
    wider, rounded once to the weight's dtype)."""
    conf, base, pairs = read_adapter(path, lora_base)
    model = cls.from_pretrained(base, dtype, device)
    scale = conf["lora_alpha"] / conf["r"]
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            w = check_adapter_shapes(model, name, a, b, os.path.join(path, ADAPTER_WEIGHTS), conf["r"]).weight
            acc = at_least_fp32(w.dtype)
            w.copy_((w.to(acc) + scale * (b.to(w.device, acc) @ a.to(w.device, acc))).to(w.dtype))
    return model


def check_adapter_shapes(model, name, a, b, where, rank=None):
    """-> the nn.Linear `name` of model that the pair (A, B) of rank `rank` (None: A's) adapts; errors name the key
    and both shapes."""
    try:
        lin = model.get_submodule(name)
    except AttributeError:
        raise KeyError(f"{where}: base_model.model.{name}: no such layer in the base model") from None
    lin = getattr(lin, "base_layer", lin)  # (a model with adapters of its own)
    r = rank or a.shape[0]
    for part, got, want in (("A", a.shape, (r, lin.in_features)), ("B", b.shape, (lin.out_features, r))):
        if tuple(got) != want:
            raise ValueError(f"{where}: base_model.model.{name}.lora_{part}.weight has shape {list(got)}, the base's "
                             f"layer needs {list(want)}")
    return lin


def is_reward_model_dir(path):
    """True for a reward-model checkpoint (config.json's architectures are *ForSequenceClassification; without
    architectures, a score.weight tensor), False for a causal LM."""
    conf = os.path.join(path, "config.json")
    archs = (json.load(open(conf)).get("architectures") or []) if os.path.isfile(conf) else []
    if archs:
        return any(a.endswith("ForSequenceClassification") for a in archs)
    return any("score.weight" in keys for keys in _weight_files(path).values())
