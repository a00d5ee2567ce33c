"""
Why engine.Engine runs its CPU linears through oneDNN: F.linear vs oneDNN's linear on a prepacked weight
(engine.onednn_linears), per call, at the shapes a decode step and a prefill hit. fp32, one process.

    python bench/linear.py --threads=1

Prints, per (rows M, in K, out N): microseconds of each, their ratio, and whether the Engine routes that call
to oneDNN (M*K*N >= engine.ONEDNN_MIN_MACS).
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import hardware  # noqa: E402  (bench/common.py)
from engine import ONEDNN_MIN_MACS, onednn_available  # noqa: E402

SHAPES = [  # (M, K, N): decode rows x hidden -> out, for the tiny / small presets and Qwen2.5-0.5B
    (1, 192, 512), (4, 192, 512), (16, 192, 192), (16, 192, 512), (16, 512, 192),
    (1, 256, 32768), (16, 256, 32768), (1, 896, 4864), (16, 896, 4864), (64, 896, 4864),
    (1024, 192, 512), (1024, 896, 4864),  # prefill-sized
]


def time_us(fn, min_s=0.2):
    for _ in range(3):
        fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_s:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n * 1e6


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not onednn_available():
        raise SystemExit("this PyTorch build has no oneDNN linear")
    print(f"hardware: {hardware(args.threads)} | torch {torch.__version__} | fp32")
    print(f"{'M':>5} {'K':>5} {'N':>6}  {'F.linear us':>12} {'oneDNN us':>10}  speedup  routed")
    for M, K, N in SHAPES:
        x, w = torch.randn(M, K), torch.randn(N, K) / K**0.5
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        with torch.inference_mode():
            ref = time_us(lambda: F.linear(x, w))
            ours = time_us(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
        routed = "oneDNN" if M * K * N >= ONEDNN_MIN_MACS else "F.linear"
        print(f"{M:>5} {K:>5} {N:>6}  {ref:>12.1f} {ours:>10.1f}  x{ref / ours:5.2f}  {routed}")


if __name__ == "__main__":
    main()
