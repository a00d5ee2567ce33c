"""
The Engine with tools: generated tokens/s on one batch in which about half the rows call the python tool -- real
calls, run in the sandbox while the other rows decode, each answer fed to its row in one forward -- beside the same
batch with no tools. Random weights of the tiny world's shape with its tokenizer, sampled at temperature 1, EOS ignored,
so every row makes max_new_tokens either way (tool output counts towards them).

    python bench/tool_calls.py --threads=2
    python bench/tool_calls.py --batch=64 --max_new_tokens=256
    python bench/tool_calls.py --latency=40     # one print(1+1) through call_tool: warm server vs a fresh one
    python bench/tool_calls.py --tool_ms=300 --call_frac=0.25 --repeats=1   # a slow tool: does the batch stall?
    python bench/tool_calls.py --tool_ms=300 --call_frac=0.25 --repeats=1 --workers=8   # ... with 8 calls at once

Which rows call is decided from their own text (a row calls once its text since the last result reaches --every
characters, if the CRC of those characters is even), since a random model writes no real calls; the calls, their
sandbox and the forced tokens are the real ones.
"""
import argparse
import os
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import hardware  # noqa: E402  (bench/common.py)

TINY_TOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tiny", "tokenizer")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--every", type=int, default=60, help="characters a calling row writes between calls")
    p.add_argument("--call_frac", type=float, default=0.5, help="about this share of the calls a rule allows are made")
    p.add_argument("--tool_ms", type=int, default=0, help="each call sleeps this long in the sandbox (0: it sums "
                   "squares, a few ms); with it the report compares the wall time with a batch that stalls for each "
                   "step's calls and with one where no row waits for another's")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side; the fastest is kept")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--workers", type=int, default=0, help="tool calls that run at once (0: the cores the rank may use, "
                   "as in training; a tool that waits rather than computes can use more)")
    p.add_argument("--latency", type=int, default=0, help="instead: time this many print(1+1) calls through call_tool, "
                   "forked from the running sandbox server and from a server started for the call, alternating")
    p.add_argument("--pause", type=float, default=0.1, help="latency: seconds between calls (a few decode steps)")
    args = p.parse_args()
    if args.latency:
        return latency(args)

    import torch

    from engine import Engine
    from model import ModelConfig, Transformer
    from tokenizer import Tokenizer
    from tools import Call, ToolUse

    if args.threads:
        torch.set_num_threads(args.threads)
    tok = Tokenizer.from_pretrained(TINY_TOK)

    class HalfTheRows(ToolUse):
        """The python tool in the code format, but a row 'writes' a call by the rule in the docstring above."""

        def may_close(self, token):
            return True

        def calls(self, segment):
            if len(segment) < args.every or zlib.crc32(segment[:args.every].encode()) % round(1 / args.call_frac):
                return []
            code = f"import time\ntime.sleep({args.tool_ms / 1e3})" if args.tool_ms else \
                "print(sum(i * i for i in range(10000)))"
            return [Call("python", {"code": code})]

        def start(self, calls, made_before):  # which decode step the calls started at (the stall prediction)
            self.call_steps.add(len(steps))
            return super().start(calls, made_before)

    with tempfile.TemporaryDirectory() as ckpt:
        torch.manual_seed(0)
        Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, dtype="float32")).init_weights(
            std=0.02).save_pretrained(ckpt)
        model = Transformer.from_pretrained(ckpt)
    engine, steps, decode = Engine(model, tok), [], Engine._decode
    engine._decode = lambda *a: steps.append(1) or decode(engine, *a)  # counts the batch's decode steps
    prompts = [tok.encode(f"What is {i}*{i + 3}-{2 * i}?") for i in range(args.batch)]
    tools = HalfTheRows(tok, ["python"], format="code", max_calls=100)
    tools.workers = args.workers or tools.workers

    def run(use):
        tools.call_steps = set()
        t0 = time.perf_counter()
        out = engine.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0, ignore_eos=True,
                              tools=use)
        return time.perf_counter() - t0, [o[0] for o in out], len(tools.call_steps)

    results = {}
    for name, use in (("no tools", None), ("python tool", tools)):
        run(use)  # warmup
        best, outs, call_steps = min((run(use) for _ in range(args.repeats)), key=lambda r: r[0])
        tokens = sum(len(c.tokens) for c in outs)
        results[name] = dict(tok_s=tokens / best, seconds=best, tokens=tokens, call_steps=call_steps,
                             rows_calling=sum(bool(c.tool_calls) for c in outs),
                             calls=sum(len(c.tool_calls) for c in outs),
                             forced=sum(c.tool_tokens for c in outs), outs=outs)
    print(f"hardware: {hardware(args.threads)}; torch {torch.__version__}; batch {args.batch} x "
          f"{args.max_new_tokens} new tokens, temperature 1, EOS ignored; {tools.workers} calls at once; best of "
          f"{args.repeats}")
    for name, r in results.items():
        print(f"{name:12s} {r['tok_s']:8.0f} tokens/s  ({r['tokens']} tokens in {r['seconds']:.2f} s; "
              f"{r['rows_calling']} of {args.batch} rows call, {r['calls']} calls, {r['forced']} forced tokens)")
    with_tool = results["python tool"]
    if args.tool_ms:  # the two walls a slow tool allows: stalling per step, or per calling row's chain
        base, call_s, outs, n = results["no tools"]["seconds"], args.tool_ms / 1e3, with_tool["outs"], \
            with_tool["call_steps"]
        chain = max(len(c.tool_calls) for c in outs)
        print(f"a {args.tool_ms} ms tool: wall {with_tool['seconds']:.2f} s; no tools {base:.2f} s + one call per step "
              f"that starts calls ({n} steps) = {base + n * call_s:.2f} s (the batch stalls); + one call per calling "
              f"row's chain (at most {chain} calls) = {base + chain * call_s:.2f} s (no row waits)")
    print(f"ratio (python tool / no tools): {results['python tool']['tok_s'] / results['no tools']['tok_s']:.2f}x")


def latency(args):
    """The wall time of one call_tool("python", print(1+1)): a copy forked from the running sandbox.SERVER against a
    server started for the call (a fresh Python importing PRELOAD, as every call ran before the server), alternating
    call by call."""
    import statistics

    import sandbox
    from tools import call_tool

    times = {"warm": [], "fresh": []}
    for i in range(2 * args.latency + 2):
        kind = ("warm", "fresh")[i % 2]
        if kind == "fresh":
            sandbox.SERVER.stop()
        else:
            sandbox.SERVER.start()
        time.sleep(args.pause)  # the model decodes between calls
        t0 = time.perf_counter()
        assert call_tool("python", {"code": "print(1+1)"}) == ("2", None)
        if i >= 2:  # the first of each: warmup
            times[kind].append(time.perf_counter() - t0)
    print(f"hardware: {hardware(args.threads)}; {args.latency} calls of each, {args.pause * 1e3:.0f} ms apart")
    for kind, ts in times.items():
        ts = sorted(ts)
        print(f"{kind:6s} median {1e3 * statistics.median(ts):6.1f} ms | p90 {1e3 * ts[int(0.9 * len(ts))]:6.1f} ms | "
              f"min {1e3 * ts[0]:6.1f} ms")
    print(f"ratio (fresh / warm, median): {statistics.median(times['fresh']) / statistics.median(times['warm']):.1f}x")


if __name__ == "__main__":
    main()
