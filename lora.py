"""
LoRA (Hu et al., arXiv 2106.09685, eq. 3): a frozen linear W0 gains a low-rank update, h = W0 x + (alpha / r) B A x,
with A [r, in] and B [out, r] the only weights trained. B starts at zero, so step 0 is the base model exactly.

The adapters stay unmerged: the Engine samples through the same modules the trainer trains, on the same copy of the base
(under FSDP an unsharded copy of both, refreshed after each update), so the sampler never runs stale weights and a
low-precision base is never merged into and out of. The frozen base is kept in the compute dtype (bf16 on a GPU, no fp32
master copy), the adapters and their AdamW state in fp32. The reference model for the KL term is the policy with its
adapters switched off (adapters_off), not a second model.

Adapters are read and written in PEFT's format (adapter_config.json + adapter_model.safetensors, keys
base_model.model.<module>.lora_A.weight / .lora_B.weight), which PeftModel.from_pretrained and vLLM's LoRARequest
load as they are; Transformer.from_pretrained(adapter_dir) gives the base with the adapter merged in.
"""
import contextlib
import json
import math
import os

import torch
import torch.nn as nn

from model import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Transformer, check_adapter_shapes, is_adapter_dir, read_adapter

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # "all-linear"


class LoRALinear(nn.Module):
    """base_layer(x) + scale * lora_B(lora_A(x)), PEFT's module layout (so the parameter names are PEFT's keys)."""

    def __init__(self, base_layer: nn.Linear, rank, alpha, dtype):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT initialises A; B = 0
        nn.init.zeros_(self.lora_B.weight)
        self.scale, self.enabled = alpha / rank, True

    def forward(self, x):
        y = self.base_layer(x)
        if not self.enabled:
            return y
        if not torch.is_autocast_enabled(x.device.type):  # (the Engine: a bf16 base's x meets fp32 adapters)
            x = x.to(self.lora_A.weight.dtype)
        # in place: the base's output is not saved for its backward, and one [tokens, out] tensor per layer fewer
        return y.add_(self.lora_B(self.lora_A(x)), alpha=self.scale)


def parse_targets(targets):
    """'all-linear' or a comma list of LORA_TARGETS' names -> a tuple of names."""
    names = LORA_TARGETS if targets == "all-linear" else tuple(t.strip() for t in targets.split(",") if t.strip())
    unknown = [t for t in names if t not in LORA_TARGETS]
    if unknown or not names:
        raise ValueError(f"--lora_targets={targets}: {unknown or 'empty'} matches no layer; the linear layers are "
                         f"{', '.join(LORA_TARGETS)} (or all-linear; never lm_head or the embeddings)")
    return names


def add_lora(model, rank, alpha, targets="all-linear", dtype=torch.float32):
    """Freeze model and give each target linear of every block LoRA adapters of this rank (in place); model.lora
    holds what adapter_config.json records."""
    names = parse_targets(targets)
    model.requires_grad_(False)
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if name in names:
                    setattr(parent, name, LoRALinear(child, rank, alpha, dtype))
    model.lora = {"r": rank, "lora_alpha": alpha, "target_modules": list(names)}
    return model


def tokenizer_dir(path, lora_base=""):
    """Where the tokenizer of the checkpoint at path is: path itself, or for an adapter saved without one (as PEFT
    saves them) its base."""
    if is_adapter_dir(path) and not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return read_adapter(path, lora_base or None)[1]
    return path


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def adapters_off(model):
    """The base model inside the block (the reference of a LoRA policy); a model without adapters is itself."""
    layers = lora_layers(model)
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


def lora_model(init_from, rank, alpha, targets, lora_base, dtype, adapter_dtype, device):
    """The model LoRA trains: init_from a plain checkpoint (new adapters of rank, alpha, targets on it) or an adapter
    dir (its base, --lora_base or the one it names, and its adapters, trained further: its r, alpha and targets).
    The base in dtype, the adapters in adapter_dtype. model.lora["base"] is the base's path, for the checkpoints."""
    if not is_adapter_dir(init_from):
        model = add_lora(Transformer.from_pretrained(init_from, dtype, device), rank, alpha, targets, adapter_dtype)
        model.lora["base"] = init_from
        return model
    conf, base, pairs = read_adapter(init_from, lora_base or None)
    if rank and rank != conf["r"]:
        raise ValueError(f"--lora_rank={rank}, but the adapter {init_from} has r={conf['r']}")
    if not isinstance(conf.get("target_modules"), list):
        raise ValueError(f"{os.path.join(init_from, ADAPTER_CONFIG)}: target_modules must be a list of layer names")
    model = add_lora(Transformer.from_pretrained(base, dtype, device), conf["r"], conf["lora_alpha"],
                     ",".join(conf["target_modules"]), adapter_dtype)
    model.lora["base"] = base
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if set(pairs) != set(layers):
        raise KeyError(f"{os.path.join(init_from, ADAPTER_WEIGHTS)}: adapts {len(pairs)} layers, its config names "
                       f"{len(layers)}: {sorted(set(pairs) ^ set(layers))[:4]}")
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            check_adapter_shapes(model, name, a, b, os.path.join(init_from, ADAPTER_WEIGHTS), conf["r"])
            layers[name].lora_A.weight.copy_(a)
            layers[name].lora_B.weight.copy_(b)
    return model


def save_adapter(path, state, lora):
    """Write the adapters of a model's state dict (its own, or FSDP's gathered one) into the directory path in PEFT's
    format; lora: model.lora."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in state.items()
               if ".lora_A." in k or ".lora_B." in k}
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=lora["r"], lora_alpha=lora["lora_alpha"],
                  target_modules=lora["target_modules"], base_model_name_or_path=lora["base"], bias="none",
                  lora_dropout=0.0, fan_in_fan_out=False, use_rslora=False, use_dora=False, inference_mode=True,
                  modules_to_save=None)
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
