"""
SFT training throughput and peak memory: nanoR1 (model.py + fused chunked cross-entropy, the exact
train_sft.py step) vs a plain transformers Qwen2ForCausalLM + F.cross_entropy on the full logits.
Same config (vocab 151936, Qwen2.5's), same batch, same AdamW; one run each, ratios printed.

    python bench/train.py                         # CPU-sized defaults, ~1-2 min on 2 cores
    python bench/train.py --hidden=896 --layers=24 --heads=14 --kv_heads=2 --inter=4864 \\
        --batch=4 --seq=2048 --steps=10            # Qwen2.5-0.5B shape on a GPU

Each implementation runs in a fresh subprocess so peak memory is its own: on CPU the process's peak RSS
(getrusage ru_maxrss), also shown net of the RSS just before training (imports + weights + optimizer);
on CUDA torch.cuda.max_memory_allocated. Timing excludes one warmup step. transformers is only
imported here, never by train_sft.py.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import hardware, peak_memory_bytes, run_worker  # noqa: E402  (bench/common.py)


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(a):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    dev = torch.device(a.device)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    dims = dict(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter, num_hidden_layers=a.layers,
                num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, tie_word_embeddings=True)
    x = torch.randint(0, a.vocab, (a.batch, a.seq), device=dev)
    if a.impl == "ours":
        import dataloader
        import train_sft
        from model import ModelConfig, Transformer
        from train_common import make_optimizer

        with dev:  # built and initialised on the device: a 1.5B random init on the CPU alone takes ~10 s
            model = Transformer(ModelConfig(**dims, dtype="float32")).init_weights()
        cfg = train_sft.configure([])
        opt = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), fused=dev.type == "cuda")
        rows = [[(row.tolist(), [1] * a.seq)] for row in x.cpu()]  # one document per row: plain causal path
        batch = {k: v.to(dev) for k, v in dataloader.collate(rows, 0).items()}
        n = (batch["targets"] != -100).sum()

        def step():
            with amp:
                loss = train_sft.batch_loss_sum(model, model.lm_head.weight, batch, a.ce_chunk) / n
            loss.backward()
            return loss
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(Qwen2Config(**dims, attn_implementation="sdpa")).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                                fused=dev.type == "cuda")
        targets = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], 1)

        def step():
            with amp:
                logits = model(input_ids=x).logits
                loss = F.cross_entropy(logits.float().view(-1, a.vocab), targets.view(-1), ignore_index=-100)
            loss.backward()
            return loss
    model.train()

    def train_step():
        loss = step()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    rss_before = rss_mb()
    train_step()  # warmup (allocator, first-call overheads)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    for _ in range(a.steps):
        loss = train_step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    out = {"impl": a.impl, "tokens_per_s": a.steps * a.batch * a.seq / dt, "loss": loss,
           "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    out["peak_mb"] = peak_memory_bytes(dev) / 2**20
    out["peak_over_start_mb"] = out["peak_mb"] - (base / 2**20 if dev.type == "cuda" else rss_before)
    print(json.dumps(out))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--inter", type=int, default=384)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--ce_chunk", type=int, default=1024)
    p.add_argument("--device", default="auto")
    p.add_argument("--impl", default="", help=argparse.SUPPRESS)  # internal: run one side in this process
    a = p.parse_args()
    if a.device == "auto":
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.impl:
        return worker(a)

    res = {}
    for impl in ("hf", "ours"):
        res[impl] = run_worker([os.path.abspath(__file__), f"--impl={impl}"] +
                               [f"--{k}={v}" for k, v in vars(a).items() if k != "impl"])
    import torch
    hw = hardware()
    print(f"hardware: {hw}; torch {torch.__version__}")
    print(f"config: vocab {a.vocab}, hidden {a.hidden}, layers {a.layers}, heads {a.heads}/{a.kv_heads}, "
          f"batch {a.batch} x seq {a.seq}, {a.steps} timed steps, {'bf16 autocast' if a.device == 'cuda' else 'fp32'}, "
          f"params {res['ours']['params_M']:.1f}M")
    print(f"{'':32}{'tokens/s':>12}{'peak MB':>12}{'peak-start MB':>15}")
    names = {"hf": "transformers + F.cross_entropy", "ours": "nanoR1 + chunked CE"}
    for impl in ("hf", "ours"):
        r = res[impl]
        print(f"{names[impl]:32}{r['tokens_per_s']:12.0f}{r['peak_mb']:12.0f}{r['peak_over_start_mb']:15.0f}")
    h, o = res["hf"], res["ours"]
    print(f"ratios (ours/hf): speed {o['tokens_per_s'] / h['tokens_per_s']:.2f}x (target >= 1.0), "
          f"peak memory {o['peak_mb'] / h['peak_mb']:.2f}x (target <= 0.6), "
          f"peak over start {o['peak_over_start_mb'] / h['peak_over_start_mb']:.2f}x")


if __name__ == "__main__":
    main()
