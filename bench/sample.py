"""
Rollout throughput: engine.py's Engine vs transformers' generate() on the same random checkpoint, same
prompts (mixed lengths, left-padded), same number of new tokens (EOS ignored), greedy (or --temperature); each
(impl, batch) in a fresh subprocess so peak memory is its own.

    python bench/sample.py --threads=1                       # CPU: the tiny world's shape, batch 1 and 16
    python bench/sample.py --threads=1 --preset=small        # CPU: a shrunk Qwen with a 32k vocabulary
    python bench/sample.py --preset=0.5b --batch_sizes=1,16,64 --max_new_tokens=256   # GPU, bf16, CUDA graphs
    python bench/sample.py --preset=1.5b --batch_sizes=1,64 --hbm_bandwidth=4.8e12    # e.g. on an H200

Reported per batch size: end-to-end tokens/s (prefill included) and decode tokens/s (timed as the run with
max_new_tokens minus the run with 1 new token), their ratio to transformers, and peak memory (CUDA:
max_memory_allocated; CPU: the process's max RSS). On CUDA also batch-1 decode as a fraction of the
memory-bandwidth roofline: (bytes of weights + bytes of KV cache read per step) / HBM bandwidth / step time.
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import QWEN25_SHAPES, hardware, peak_memory_bytes, run_worker  # noqa: E402  (bench/common.py)

PRESETS = {  # Qwen2-shaped; "tiny" ~ the embedded world's model, "small" a shrunk Qwen (32k vocab) for a CPU
    "tiny": dict(vocab_size=512, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    "small": dict(vocab_size=32768, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
    "0.5b": QWEN25_SHAPES["0.5b"],
    "1.5b": QWEN25_SHAPES["1.5b"],
}


def prompts(args, batch, vocab):
    import torch

    g = torch.Generator().manual_seed(batch)
    lo = args.min_prompt_len or args.prompt_len // 2
    lens = torch.randint(lo, args.prompt_len + 1, (batch,), generator=g).tolist()
    return [torch.randint(10, vocab, (n,), generator=g).tolist() for n in lens]


def worker(args):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batch = args.batch
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if args.impl == "hf":
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=dtype)
        except TypeError:  # transformers < 4.56 calls it torch_dtype
            model = AutoModelForCausalLM.from_pretrained(args.ckpt, torch_dtype=dtype)
        model = model.to(device, dtype).eval()
        vocab = model.config.vocab_size
        ps = prompts(args, batch, vocab)
        L = max(map(len, ps))
        ids = torch.tensor([[0] * (L - len(p)) + p for p in ps], device=device)
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in ps], device=device)
        model.generation_config.eos_token_id = None  # never stop early: every row makes max_new_tokens
        sampling = dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0) if args.temperature \
            else dict(do_sample=False)
        if args.hf_cache != "dynamic":
            sampling["cache_implementation"] = args.hf_cache

        def run(n):
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, pad_token_id=0, **sampling)
            assert out.shape[1] == L + n
    else:
        from model import Transformer
        from engine import Engine

        model = Transformer.from_pretrained(args.ckpt, dtype=dtype, device=device).eval()
        vocab = model.config.vocab_size
        ps = prompts(args, batch, vocab)
        engine = Engine(model, None, cuda_graphs=bool(args.cuda_graphs) and device == "cuda", compile=bool(args.compile))

        def run(n):
            out = engine.generate(ps, max_new_tokens=n, temperature=args.temperature, ignore_eos=True, seed=0)
            assert all(len(o[0].tokens) == n for o in out)
    N = args.max_new_tokens
    run(N)  # warmup at full length (CUDA graphs get captured here)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = {}
    # the full-length runs first: a 1-token run needs a shorter KV cache, and the Engine drops its kept cache and
    # CUDA graphs for it, so timing it in between would put a graph capture into the next full-length run
    for n in (N, 1):
        best = float("inf")
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            run(n)
            sync()
            best = min(best, time.perf_counter() - t0)
        times[n] = best
    peak = peak_memory_bytes(device)
    cfg = json.load(open(os.path.join(args.ckpt, "config.json")))
    print(json.dumps(dict(impl=args.impl, batch=batch, tok_s=batch * N / times[N],
                          decode_tok_s=batch * (N - 1) / max(times[N] - times[1], 1e-9),
                          step_s=(times[N] - times[1]) / (N - 1), peak_bytes=peak, device=device,
                          context=sum(map(len, ps)) / batch + N / 2, n_params=sum(p.numel() for p in model.parameters()),
                          elem=torch.finfo(dtype).bits // 8, cfg=cfg)))


def step_bytes(r):
    """Bytes one decode step must read: all weights once (a tied embedding counts once, read as the lm_head)
    + every row's KV cache up to its mean context."""
    c = r["cfg"]
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    kv_per_token = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head_dim * r["elem"]
    return r["n_params"] * r["elem"] + r["batch"] * r["context"] * kv_per_token


def roofline_fraction(r, bandwidth):
    """step_bytes / bandwidth / measured step time."""
    return step_bytes(r) / bandwidth / r["step_s"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--batch_sizes", default="1,16", help="comma-separated; on a GPU use e.g. 1,16,64")
    p.add_argument("--prompt_len", type=int, default=64, help="prompts get lengths in [min_prompt_len, prompt_len]")
    p.add_argument("--min_prompt_len", type=int, default=0, help="0: prompt_len/2 (= prompt_len: all one length)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per point; the fastest is kept")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; >0: sampling (top_k 0, top_p 1)")
    p.add_argument("--hf_cache", default="dynamic", help="transformers' cache_implementation (dynamic, static)")
    p.add_argument("--cuda_graphs", type=int, default=1)
    p.add_argument("--compile", type=int, default=0, help="1: torch.compile the captured decode step (CUDA)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per side (0: torch's default); use 1 "
                   "on a shared machine, where OpenMP spin-waiting makes multi-threaded timings meaningless")
    p.add_argument("--hbm_bandwidth", type=float, default=3.35e12, help="bytes/s for the roofline (H100 SXM)")
    p.add_argument("--impl", default=None, help=argparse.SUPPRESS)  # worker mode
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:
        return worker(args)

    import torch

    from model import ModelConfig, Transformer

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as ckpt:
        torch.manual_seed(0)
        cfg = ModelConfig(**PRESETS[args.preset], tie_word_embeddings=True, rope_theta=1e6,
                          dtype="bfloat16" if cuda else "float32")
        Transformer(cfg).init_weights().to(torch.bfloat16 if cuda else torch.float32).save_pretrained(ckpt)
        rows = []
        for b in map(int, args.batch_sizes.split(",")):
            for impl in ("hf", "ours"):
                rows.append(run_worker([__file__, f"--impl={impl}", f"--batch={b}", f"--ckpt={ckpt}"] + sys.argv[1:]))
    print(f"hardware: {hardware(args.threads)} | torch {torch.__version__} | preset={args.preset} "
          f"params={rows[0]['n_params'] / 1e6:.1f}M prompt_len<={args.prompt_len} new={args.max_new_tokens} "
          f"{'greedy' if not args.temperature else f'T={args.temperature}'}")
    for hf, ours in zip(rows[0::2], rows[1::2]):
        line = (f"batch {ours['batch']:>3}: ours {ours['tok_s']:9.0f} tok/s (decode {ours['decode_tok_s']:9.0f})  "
                f"hf {hf['tok_s']:9.0f} tok/s (decode {hf['decode_tok_s']:9.0f})  "
                f"speed x{ours['tok_s'] / hf['tok_s']:.2f} (decode x{ours['decode_tok_s'] / hf['decode_tok_s']:.2f})  "
                f"peak mem ours {ours['peak_bytes'] / 2**20:.0f} MiB hf {hf['peak_bytes'] / 2**20:.0f} MiB")
        if ours["device"] == "cuda":
            line += (f"  roofline ours {100 * roofline_fraction(ours, args.hbm_bandwidth):.0f}% "
                     f"hf {100 * roofline_fraction(hf, args.hbm_bandwidth):.0f}%")
        print(line)


if __name__ == "__main__":
    main()
