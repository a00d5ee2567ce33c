"""
Training forward+backward throughput and peak memory: our model.py vs transformers' Qwen2ForCausalLM,
same config, same weights, same batch, measured in one run (each side in a fresh subprocess so peak
memory is its own).

    python bench/forward.py                          # CPU, small Qwen2-shaped config
    python bench/forward.py --preset=0.5b --batch_size=8 --seq_len=1024   # on a GPU, bf16

Both sides compute the loss from full logits with F.cross_entropy, so this measures the model body;
`ours+chunkedCE` adds the row our training scripts actually run (chunked_cross_entropy on hidden states).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import QWEN25_SHAPES, hardware, peak_memory_bytes, run_worker  # noqa: E402  (bench/common.py)

PRESETS = {  # Qwen2-shaped configs; "small" fits a 2-core CPU in about a minute
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
    "0.5b": QWEN25_SHAPES["0.5b"],
    "1.5b": QWEN25_SHAPES["1.5b"],
}


def worker(args):
    import torch
    import torch.nn.functional as F

    from model import ModelConfig, Transformer, chunked_cross_entropy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = dict(PRESETS[args.preset], tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768)
    if args.impl == "hf":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(Qwen2Config(**cfg, attn_implementation="sdpa")).to(device, dtype)

        def loss_fn(x):
            logits = model(x).logits[:, :-1]
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    else:
        cfg.pop("max_position_embeddings")
        model = Transformer(ModelConfig(**cfg)).init_weights().to(device, dtype)

        def loss_fn(x):
            if args.impl == "ours+chunkedCE":
                h = model(x, return_hidden=True)[:, :-1]
                return chunked_cross_entropy(h, model.lm_head.weight, x[:, 1:])
            logits = model(x)[:, :-1]
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    model.train()
    x = torch.randint(0, cfg["vocab_size"], (args.batch_size, args.seq_len), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        loss_fn(x).backward()
        model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss_fn(x).backward()
        model.zero_grad(set_to_none=True)
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    peak = peak_memory_bytes(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps(dict(impl=args.impl, tok_s=args.batch_size * args.seq_len / dt, step_s=dt,
                          peak_bytes=peak, device=device, n_params=n_params,
                          flops_per_token=model.flops_per_token(args.seq_len) if args.impl != "hf" else None)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak_flops", type=float, default=989e12, help="for MFU on GPU (H100 bf16 dense)")
    p.add_argument("--impl", default=None, help=argparse.SUPPRESS)  # worker mode
    args = p.parse_args()
    if args.impl:
        return worker(args)
    rows = {}
    for impl in ("hf", "ours", "ours+chunkedCE"):
        rows[impl] = run_worker([__file__, f"--impl={impl}"] + sys.argv[1:])
    import torch

    print(f"hardware: {hardware()} | torch {torch.__version__} | preset={args.preset} batch={args.batch_size} "
          f"seq={args.seq_len} params={rows['ours']['n_params'] / 1e6:.1f}M device={rows['hf']['device']}")
    ref = rows["hf"]
    for impl, r in rows.items():
        line = (f"{impl:>15}: {r['tok_s']:10.0f} tok/s  peak {r['peak_bytes'] / 2**20:8.0f} MiB  "
                f"speed x{r['tok_s'] / ref['tok_s']:.2f}  memory x{r['peak_bytes'] / ref['peak_bytes']:.2f}")
        if r["device"] == "cuda":  # same model FLOPs for every row: Transformer.flops_per_token
            line += f"  MFU {100 * rows['ours']['flops_per_token'] * r['tok_s'] / args.peak_flops:.1f}%"
        print(line)


if __name__ == "__main__":
    main()
