"""
Sampling for nanoR1: the rollout Engine GRPO runs on, plus a CLI to chat with / evaluate a checkpoint.

    python sample.py                                                  # the embedded tiny model, one test problem
    python sample.py --init_from=DIR --prompt="What is 2+3?" --chat=1 --temperature=0
    python sample.py --init_from=DIR --eval --data=data/tiny/test.jsonl --num_samples=8 --temperature=0.6
    torchrun --nproc_per_node=8 sample.py --init_from=DIR --eval --data=FILE.jsonl --num_samples=16
    python sample.py --reject=1 --init_from=DIR --data=PROBLEMS.jsonl --num_samples=4 --out=SFT.jsonl  # R1 stage 3

In code (prompts are token-id lists; out[i][j] is sample j of prompt i):

    engine = Engine(model, tokenizer)
    out = engine.generate([ids_a, ids_b], num_samples=8, max_new_tokens=512, temperature=1.0, seed=0)
    out[0][3].tokens, out[0][3].text, out[0][3].logprobs, out[0][3].finish_reason

What makes it fast, in the order it happens:
  1. all prompts are left-padded into one batch and prefilled once into a static, preallocated KV cache
     (model.KVCache: positions count real tokens only, so padding never changes an output);
  2. each prompt's cache rows are fanned out to its num_samples rows (the GRPO group) -- no G-fold prefill;
  3. decoding runs sync_every steps between host syncs; rows that finished are compacted away;
  4. on CUDA the one-token decode step is captured in a CUDA graph per batch size (static cache path:
     full-length masked attention, write position held in a device tensor), removing per-op launch cost;
     on the CPU the linears run through oneDNN on prepacked weights (onednn_linears), 1.5-3x faster at the
     skinny matmuls of decoding than F.linear on the machine of bench/README.md.

Randomness is per row: row r draws all its uniforms up front from torch.Generator().manual_seed(seed_r) and
samples by inverse CDF, so a row's tokens depend only on its seed and its logits -- not on the batch it is
in, on which rows finished, or on the device. With generate(seed=s), row r = i*num_samples + j gets
seed_r = s + r; pass a list of seeds to choose them yourself (sample.py --eval uses s + problem*K + j).
"""
import contextlib
import functools
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from configurator import parse_overrides

REPO = os.path.dirname(os.path.abspath(__file__))
TINY_BASE = os.path.join(REPO, "data/tiny/model")  # shipped: pretrained on plain-text worked solutions only
TINY_SFT = os.path.join(REPO, "out/sft/ckpt")  # what `python train_sft.py` writes (chat + <think>)
TINY_GRPO = os.path.join(REPO, "out/grpo/ckpt")  # what the quickstart's `python train_grpo.py` writes
DEFAULT_DATA = os.path.join(REPO, "data/tiny/test.jsonl")

# -----------------------------------------------------------------------------
# one sampling step


def argmax_rows(x):
    """x.argmax(-1) for x [B, V], same result (first index of the maximum). On the CPU argmax is a scalar loop
    (~0.3 ms for 16 x 32k) while amax is vectorised, so take the max of each 128-wide block, then argmax over
    the block maxima and within the one winning block (~0.05 ms)."""
    B, V = x.shape
    if x.device.type != "cpu" or V % 128:
        return x.argmax(-1)
    blocks = x.view(B, V // 128, 128)
    j = blocks.amax(-1).argmax(-1)
    return j * 128 + blocks[torch.arange(B), j].argmax(-1)


def sample_tokens(logits, u=None, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, out=None):
    """Pick one token per row. logits [B, V]; u [B] uniforms in [0, 1) (ignored when temperature == 0).

    Returns (tokens [B], logprobs [B]). logprobs are log softmax(logits / T) at the chosen token: the
    *unfiltered* temperature-scaled policy, which is what GRPO's log pi_old must be (top-k/top-p/min-p only
    decide which tokens can be drawn). Greedy (T=0) reports T=1 log-probs.
    Sampling is by inverse CDF over the filtered probabilities: exact, and one uniform per row per token.
    out: optional fp32 buffer of >= B rows x V for the log-softmax. The Engine reuses one across steps: on the
    CPU a fresh [B, vocab] tensor each step is handed back to the OS by malloc and page-faulted in again
    (~0.6 ms per step at 16 x 32k, ~10% of a small model's step).
    """
    x = logits.float()
    if temperature not in (0, 1):  # not x / 1.0: a full pass over [B, vocab] is ~10% of a small model's CPU step
        x = x / temperature
    logp = torch.log_softmax(x, dim=-1, out=None if out is None else out[:x.shape[0]])
    if temperature == 0:
        tokens = argmax_rows(x)
    else:
        probs = logp.exp()
        V = probs.shape[-1]
        if 0 < top_k < V:
            kth = probs.topk(top_k, dim=-1).values[:, -1:]
            probs = probs.masked_fill(probs < kth, 0.0)
        if min_p > 0:
            probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
        if top_p < 1:  # keep the smallest head of the sorted distribution whose mass reaches top_p
            sp, si = probs.sort(-1, descending=True)
            cum = sp.cumsum(-1)
            sp = sp.masked_fill(cum - sp >= top_p * cum[:, -1:], 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, si, sp)
        cdf = probs.double().cumsum(-1)  # fp64: a 150k-word fp32 cumsum drifts enough to bias the tail
        target = u.to(cdf) * cdf[:, -1]
        tokens = torch.searchsorted(cdf, target[:, None], right=True)[:, 0].clamp_(max=V - 1)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


# -----------------------------------------------------------------------------
# the engine


@dataclass
class Completion:
    tokens: list  # generated ids, including the stop token that ended it (GRPO trains on emitting it)
    text: str  # decoded; the stop token's text is left out, a stop *string* is kept (text ends with it)
    logprobs: list  # per token: log softmax(logits / T) of the sampled token (see sample_tokens)
    finish_reason: str  # "stop" (stop token or stop string) or "length" (hit max_new_tokens)
    seed: int = 0  # this row's seed: generate([prompt], seed=this) reproduces the completion


@dataclass
class _Row:  # host-side bookkeeping of one output row
    seed: int
    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish: str = ""
    by_string: bool = False  # stopped by a stop string (text is cut after it)


def _buckets(n):
    """Batch sizes compaction rounds up to under CUDA graphs (one captured graph each): 1,2,3,4,6,8,12,16,..."""
    out, p = [], 1
    while p < n:
        out += [p] if p < 2 else [p, p * 3 // 2]
        p *= 2
    return sorted(set(b for b in out if b < n)) + [n]


# -----------------------------------------------------------------------------
# CPU: linears through oneDNN on prepacked weights

ONEDNN_MIN_MACS = 2**20  # below ~1M multiply-adds a call, oneDNN's fixed cost (~10 us) outweighs its faster kernel


def onednn_available():
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._linear_pointwise is not None
    except (AttributeError, RuntimeError):  # a build without oneDNN, or the private op was renamed
        return False


@contextlib.contextmanager
def onednn_linears(model, packed=None):
    """Inside the block, each nn.Linear of a CPU fp32 model runs through oneDNN on a copy of its weight reordered
    into oneDNN's blocked layout (the weight prepacking inductor's `freezing` does on CPU) -- for calls of at
    least ONEDNN_MIN_MACS multiply-adds; smaller ones keep F.linear.
    Why: F.linear's sgemm is slow at the skinny shapes of decoding (a few rows times a wide weight); on the
    AMD EPYC of bench/README.md the packed kernel is 1.5-3x faster per call (16 rows x a 32k-word lm_head:
    5.2 ms -> 1.6 ms).
    packed: a dict kept across calls (the Engine keeps one, freed by Engine.free): a weight is reordered again
    only when it changed (its version counter, bumped by every in-place update such as an optimizer step, or
    its storage), so a model trained between rollouts is never served stale, and repeated calls on the same
    weights pay the reorder (~25 ms for a 32k x 256 lm_head) once. Costs one more copy of the linear weights.
    A write through `param.data` (e.g. `p.data.copy_(w)`) does not bump the version counter: call
    Engine.free() after one (torch.optim, load_state_dict and in-place ops under no_grad all bump it)."""
    packed = {} if packed is None else packed
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        for name, lin in linears:
            key = (lin.weight.data_ptr(), lin.weight._version)
            if name not in packed or packed[name][0] != key:
                packed[name] = (key, torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach(), None))

            def forward(x, lin=lin, w=packed[name][1]):
                if x.numel() * lin.out_features < ONEDNN_MIN_MACS:
                    return F.linear(x, lin.weight, lin.bias)
                return torch.ops.mkldnn._linear_pointwise(x, w, lin.bias, "none", [], "")
            lin.forward = forward  # an instance attribute shadows Linear.forward until it is removed
        yield
    finally:
        for _, lin in linears:
            vars(lin).pop("forward", None)


def _eval_mode(method):
    """Run an Engine method in eval + inference mode (with oneDNN linears if the engine uses them), then put a
    training model back in train mode (GRPO alternates rollouts and updates on the same model)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        training = self.model.training
        self.model.eval()
        try:
            linears = onednn_linears(self.model, self._packed) if self.onednn else contextlib.nullcontext()
            with torch.inference_mode(), linears:
                return method(self, *args, **kwargs)
        finally:
            self.model.train(training)
    return wrapper


class Engine:
    """Batched generation with a static KV cache, prefix sharing, per-row stops/seeds and compaction.

    cuda_graphs: capture the decode step per batch size (default: on for CUDA). static: use the static-shape
    cache path without graphs (what graphs capture; the CPU tests check it equals the dynamic path).
    sync_every: decode steps between host syncs (stop checks, compaction); a row that stops mid-chunk costs
    at most sync_every-1 wasted steps. Default 16 on CUDA (the host runs ahead of the GPU), 1 on CPU.
    compact_frac: compact the batch once at least this fraction of its rows has finished.
    compile: torch.compile the captured step (fuses the norm/RoPE/SiLU elementwise kernels, which dominate a
    batch-1 step of a small model); only called at capture (once per batch bucket), never per token.
    onednn: run the linears through oneDNN on prepacked weights (see onednn_linears); default: on for a CPU
    float32 model where PyTorch has oneDNN.
    """

    def __init__(self, model, tokenizer=None, cuda_graphs=None, static=None, sync_every=None, compact_frac=0.25,
                 compile=False, onednn=None):
        self.model, self.tokenizer = model, tokenizer
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs)
        self.static = self.cuda_graphs if static is None else bool(static) or self.cuda_graphs
        self.sync_every = sync_every or (16 if on_cuda else 1)
        self.compact_frac = compact_frac
        cpu_fp32 = self.device.type == "cpu" and self.dtype == torch.float32
        self.onednn = (cpu_fp32 and onednn_available()) if onednn is None else bool(onednn)
        if self.onednn and not cpu_fp32:
            raise ValueError(f"onednn=True needs a float32 model on the CPU (got {self.dtype} on {self.device})")
        self._step_model = torch.compile(model) if compile and self.cuda_graphs else model
        self._cache, self._graphs, self._pool, self._packed = None, {}, None, {}

    def free(self):
        """Drop the kept KV cache, CUDA graphs and packed weights (e.g. before a training step needs the memory)."""
        self._cache, self._graphs, self._pool, self._packed = None, {}, None, {}

    # ---- cache and decode step ----

    def _get_cache(self, prefill_rows, rows, seq_len):
        from model import KVCache

        if not self.cuda_graphs:  # fresh per call: nothing to keep
            return KVCache(self.model.config, prefill_rows, seq_len, self.device, self.dtype, capacity=rows)
        # Graphs hold the cache's addresses, so keep one cache (and its graphs) across calls while it fits.
        # Lengths are rounded up to 256 so GRPO steps with slightly different prompt lengths reuse it.
        seq_len = -(-seq_len // 256) * 256
        c = self._cache
        if c is None or c.capacity != rows or c.max_seq_len != seq_len:
            self.free()
            c = self._cache = KVCache(self.model.config, rows, seq_len, self.device, self.dtype)
        c.static, c.pos = False, 0
        c.pos_t.zero_()
        c._valid.zero_()
        c._n_valid.zero_()
        c._view(prefill_rows)
        return c

    def _graph(self, cache, b):
        """The one-token decode step at batch b (cache rows [0, b)), captured once: (replay, tokens in, out)."""
        if b in self._graphs:
            return self._graphs[b]
        saved = (cache.pos_t.clone(), cache.valid.clone(), cache.n_valid.clone())

        def restore():  # warmup really runs the step (pos_t += 1, writes valid/n_valid): undo it
            cache.pos_t.copy_(saved[0]), cache.valid.copy_(saved[1]), cache.n_valid.copy_(saved[2])

        tok, out = torch.zeros(b, 1, dtype=torch.long, device=self.device), {}

        def step():  # static shapes, no host syncs: every tensor it touches lives at a fixed address
            out["logits"] = self._step_model(tok, kv_cache=cache, logits_to_keep=1)[:, -1].float()

        self._graphs[b] = (self._capture(step, restore), tok, out)
        return self._graphs[b]

    def _capture(self, step, restore):
        """Record step() into a CUDA graph after a warmup on a side stream; returns its replay."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
                restore()
        torch.cuda.current_stream().wait_stream(stream)
        self._pool = self._pool or torch.cuda.graph_pool_handle()  # all batch sizes share one memory pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            step()
        restore()
        return graph.replay

    def _decode(self, cache, tokens):
        """Feed one token per row; returns next-token logits [b, V] (fp32)."""
        if cache.pos >= cache.max_seq_len:
            raise ValueError(f"KVCache overflow: {cache.pos + 1} tokens > max_seq_len={cache.max_seq_len}")
        if self.cuda_graphs:
            replay, tok_in, out = self._graph(cache, tokens.shape[0])
            tok_in.copy_(tokens[:, None])
            replay()
            logits = out["logits"]
        else:
            logits = self.model(tokens[:, None], kv_cache=cache, logits_to_keep=1)[:, -1].float()
        if cache.static:  # the step advanced pos_t on the device; the host copy is ours to keep in step
            cache.pos += 1
        return logits

    # ---- generate ----

    @_eval_mode
    def generate(self, prompts, num_samples=1, max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                 stop=None, seed=None, ignore_eos=False, on_tokens=None):
        """prompts: list of token-id lists. Returns out[i][j]: Completion of sample j of prompt i.

        stop: extra stop token ids (ints) and/or stop strings (strs), on top of the tokenizer's stop ids
        (ignore_eos=True drops those, for benchmarks). seed: int (row r gets seed + r), a list with one seed
        per row (len(prompts) * num_samples), or None (drawn from torch's global RNG).
        on_tokens(row, ids): called at each host sync with the row's newly accepted token ids (streaming).
        """
        P, G = len(prompts), num_samples
        B = P * G
        if P == 0:
            return []
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty (need at least one token)")
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        seeds = [seed + r for r in range(B)] if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != B:
            raise ValueError(f"got {len(seeds)} seeds for {P} prompts x {G} samples = {B} rows")
        tok = self.tokenizer
        stop = [stop] if isinstance(stop, (str, int)) else list(stop or [])
        stop_ids = set() if ignore_eos or tok is None else set(tok.stop_ids)
        stop_ids |= {s for s in stop if isinstance(s, int)}
        stop_strs = [s for s in stop if isinstance(s, str) and s]
        if stop_strs and tok is None:
            raise ValueError("stop strings need a tokenizer")
        lookback = 4 * max(map(len, stop_strs), default=0) + 1  # tokens covering a stop string (>= 1 byte each)
        rows = [_Row(s) for s in seeds]
        if max_new_tokens <= 0:
            return [[self._finish(r, stop_strs) for r in rows[i * G:(i + 1) * G]] for i in range(P)]

        # prefill: every prompt once, left-padded to the longest
        L = max(map(len, prompts))
        pad = tok.pad_id if tok is not None and tok.pad_id is not None else 0
        ids = torch.tensor([[pad] * (L - len(p)) + list(p) for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        cache = self._get_cache(P, B, L + max_new_tokens)
        logits = self.model(ids, attention_mask=mask, kv_cache=cache, logits_to_keep=1)[:, -1].float()
        if G > 1:  # prefix sharing: fan each prompt's cache rows out to its G samples
            fan = torch.arange(P, device=self.device).repeat_interleave(G)
            cache.select(fan)
            logits = logits[fan]
        cache.static = self.static
        u = None
        if temperature != 0:  # all of a row's uniforms, drawn once from its own generator
            u = torch.stack([torch.rand(max_new_tokens, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
                             for s in seeds]).to(self.device)

        live = list(range(B))  # batch row k holds output row live[k] (None: padding for a graph bucket)
        buckets = _buckets(B)
        step = 0
        logp_buf = torch.empty(B, self.model.config.vocab_size, device=self.device)  # see sample_tokens
        while step < max_new_tokens:
            n = min(self.sync_every, max_new_tokens - step)
            toks, lps = [], []
            for i in range(n):
                t, lp = sample_tokens(logits, None if u is None else u[:, step + i], temperature, top_k, top_p, min_p,
                                      out=logp_buf)
                toks.append(t), lps.append(lp)
                if step + i + 1 < max_new_tokens:  # the last token never needs to be fed back
                    logits = self._decode(cache, t)
            step += n
            toks, lps = torch.stack(toks, 1).tolist(), torch.stack(lps, 1).tolist()  # the host sync
            for k, r in enumerate(live):
                if r is None or rows[r].finish:
                    continue
                before = len(rows[r].tokens)
                self._accept(rows[r], toks[k], lps[k], stop_ids, stop_strs, lookback)
                if on_tokens is not None and len(rows[r].tokens) > before:
                    on_tokens(r, rows[r].tokens[before:])
            keep = [k for k, r in enumerate(live) if r is not None and not rows[r].finish]
            if not keep or step >= max_new_tokens:
                break
            if len(live) - len(keep) >= max(1, self.compact_frac * len(live)):  # compaction
                # under CUDA graphs round up to a bucket size (one graph each), padding with dummy rows
                target = next(b for b in buckets if b >= len(keep)) if self.cuda_graphs else len(keep)
                if target < len(live):
                    sel = keep + [keep[0]] * (target - len(keep))
                    live = [live[k] for k in keep] + [None] * (target - len(keep))
                    idx = torch.tensor(sel, device=self.device)
                    cache.select(idx)
                    logits = logits[idx]
                    u = None if u is None else u[idx]
        for r in rows:
            r.finish = r.finish or "length"
        return [[self._finish(r, stop_strs) for r in rows[i * G:(i + 1) * G]] for i in range(P)]

    def _accept(self, row, toks, lps, stop_ids, stop_strs, lookback):
        """Append a chunk of sampled tokens to a row, up to and including the first stop token / string."""
        for t, lp in zip(toks, lps):
            row.tokens.append(t), row.logprobs.append(lp)
            if t in stop_ids:
                row.finish = "stop"
                return
            if stop_strs:
                tail = self.tokenizer.decode(row.tokens[-lookback:])
                if any(s in tail for s in stop_strs):
                    row.finish, row.by_string = "stop", True  # the exact cut is made on the full text
                    return

    def _finish(self, row, stop_strs):
        text = None
        if self.tokenizer is not None:
            ids = row.tokens[:-1] if row.finish == "stop" and not row.by_string else row.tokens
            text = self.tokenizer.decode(ids)
            if row.by_string:  # cut right after the earliest-ending stop string
                text = text[:min(text.find(s) + len(s) for s in stop_strs if s in text)]
        return Completion(row.tokens, text, row.logprobs, row.finish or "length", row.seed)


# -----------------------------------------------------------------------------
# eval metrics: `correct` is per problem a list of K bools, `answers` the extracted answers (None = none)


def pass_at_1(correct):
    """Mean over problems of the fraction of correct samples (the unbiased pass@1 estimate)."""
    return sum(sum(c) / len(c) for c in correct) / len(correct)


def pass_at_k(correct):
    """Fraction of problems with at least one correct sample among its K."""
    return sum(any(c) for c in correct) / len(correct)


def majority_vote(answers, equiv=None):
    """Index of the sample whose answer is the most common one (None if no sample has an answer).
    Answers are grouped with equiv(a, b) (default ==); a tie goes to the answer seen first."""
    equiv = equiv or (lambda a, b: a == b)
    groups = []  # [first index, count, representative answer]
    for i, a in enumerate(answers):
        if a is None:
            continue
        for g in groups:
            if equiv(a, g[2]):
                g[1] += 1
                break
        else:
            groups.append([i, 1, a])
    if not groups:
        return None
    return max(groups, key=lambda g: (g[1], -g[0]))[0]


def maj_at_k(correct, answers, equiv=None):
    """Fraction of problems whose majority answer is correct."""
    hits = 0
    for c, a in zip(correct, answers):
        i = majority_vote(a, equiv)
        hits += i is not None and bool(c[i])
    return hits / len(correct)


# -----------------------------------------------------------------------------
# CLI


def load_problems(path, targets=("answer",)):
    """JSONL rows with `prompt` (str) or `messages` (list) and at least one of the `targets` fields to check a
    completion against (default `answer`; rejection sampling also takes code rows' `tests`); errors name file:line."""
    from data.jsonl import iter_jsonl

    rows = []
    for lineno, row in iter_jsonl(path, required=targets if len(targets) == 1 else ()):
        if not any(k in row for k in targets):
            raise ValueError(f"{path}:{lineno}: missing field {' or '.join(map(repr, targets))}")
        if not isinstance(row.get("messages"), list) and not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}:{lineno}: needs 'prompt' (a string) or 'messages' (a list)")
        rows.append(row)
    return rows


# R1-Zero's plain-text template for base models (DeepSeek-R1 paper, Table 1); {prompt} is the question
R1_ZERO_TEMPLATE = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
                    "The assistant first thinks about the reasoning process in the mind and then provides the user "
                    "with the answer. The reasoning process and answer are enclosed within <think> </think> and "
                    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
                    "<answer> answer here </answer>. User: {prompt}. Assistant:")
PROMPT_TEMPLATES = ("chat", "raw", "r1zero")


def encode_problem(tok, row, template="chat"):
    """A problem row -> prompt token ids. template "chat": the tokenizer's chat template (rows with `messages`
    always use it, as the conversation they are); "raw": `prompt` as plain text; "r1zero": R1_ZERO_TEMPLATE
    around `prompt` (or the last user turn of `messages`). A bool means "chat" (True) or "raw" (False)."""
    template = {True: "chat", False: "raw"}.get(template, template) if isinstance(template, bool) else template
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"prompt template {template!r}: expected one of {', '.join(PROMPT_TEMPLATES)}")
    messages = row.get("messages") if isinstance(row.get("messages"), list) else None
    if template == "r1zero":
        prompt = row["prompt"] if isinstance(row.get("prompt"), str) else \
            next(m["content"] for m in reversed(messages) if m.get("role") == "user")
        return tok.encode(R1_ZERO_TEMPLATE.format(prompt=prompt))
    if messages is not None:
        return tok.apply_chat_template(messages, add_generation_prompt=True)
    if template == "chat":
        return tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True)
    return tok.encode(row["prompt"])


def score_problems(engine, problems, prompts, num_samples, gen, seed=0, batch_size=32, rank=0, world=1,
                   progress=True):
    """Generate num_samples completions per problem and score each with reward.accuracy_reward against its
    `answer`. prompts: token ids, one per problem. Under torchrun rank r takes problems r, r+world, ... and
    every rank gets the merged results. Seeds depend on the problem index only (seed + problem*K + sample), so
    the split never changes a sample. -> (results: per problem a list of sample dicts, generated tokens)."""
    from tqdm import tqdm

    from reward import accuracy_reward, answer_part, extract_answer

    K = num_samples
    mine = list(range(rank, len(problems), world))
    results = []  # (problem index, [sample dicts])
    n_tokens = 0
    bar = tqdm(total=len(problems), desc="eval", disable=rank != 0 or not progress, dynamic_ncols=True, leave=False)
    for s in range(0, len(mine), batch_size):
        idx = mine[s:s + batch_size]
        seeds = [seed + i * K + j for i in idx for j in range(K)]
        outs = engine.generate([prompts[i] for i in idx], num_samples=K, seed=seeds, **gen)
        for i, samples in zip(idx, outs):
            gold = str(problems[i]["answer"])
            rows = []
            for j, c in enumerate(samples):
                reward = float(accuracy_reward(c.text, gold))
                rows.append(dict(idx=i, sample=j, answer=gold, pred=extract_answer(answer_part(c.text)), reward=reward,
                                 correct=reward >= 1.0, finish_reason=c.finish_reason, num_tokens=len(c.tokens),
                                 completion=c.text))
                n_tokens += len(c.tokens)
            results.append((i, rows))
        bar.update(min(len(idx) * world, bar.total - bar.n))  # the other ranks keep about the same pace
    bar.close()
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, (results, n_tokens))
        results = [r for part, _ in gathered for r in part]
        n_tokens = sum(n for _, n in gathered)
    results.sort(key=lambda r: r[0])
    return [rows for _, rows in results], n_tokens


# -----------------------------------------------------------------------------
# rejection sampling (R1 stage 3): K samples per problem, the good ones become SFT rows
#
#   kept, report = rejection_sample(engine, tok, rows, num_samples=4, gen=dict(max_new_tokens=512, temperature=0.7))
#   python sample.py --reject=1 --init_from=CKPT --data=a.jsonl,b.jsonl --num_samples=K --out=SFT.jsonl

# Why a sample is dropped, in the order the checks run; a sample failing several is counted under the first.
# The per-sample checks (check_sample) go cheapest first, so correctness (for code rows a sandboxed test run)
# is decided last; the per-prompt ones follow: an exact duplicate of an earlier good sample of the same prompt,
# then the good samples past max_per_prompt.
REJECT_REASONS = ("too_long", "format", "language", "degenerate", "incorrect", "duplicate", "over_max_per_prompt")
_PIECE = re.compile(r"\w+|[^\w\s]+")  # n-gram units: words / numbers, and runs of symbols
_LETTER = re.compile(r"[^\W\d_]")
_LATEX_CMD = re.compile(r"\\[A-Za-z]+")


def max_ngram_count(text, n):
    """How often the most frequent n-gram of text's pieces (words, numbers, symbol runs) occurs, overlaps
    counted: a completion stuck in a loop repeats its period's n-grams once per turn of the loop."""
    pieces = _PIECE.findall(text)
    if len(pieces) < n:
        return 0
    return max(Counter(tuple(pieces[i:i + n]) for i in range(len(pieces) - n + 1)).values())


def cot_language(completion, lang="en"):
    """reward.language_consistency_reward of a well-formed completion, except that a chain of thought with no
    words at all (pure arithmetic, the tiny task's) mixes no languages and scores 1.0 (the reward gives 0.0,
    which is right for RL, where an empty CoT must not pay)."""
    from reward import language_consistency_reward

    score = language_consistency_reward(completion, lang)
    cot = completion.split("<think>", 1)[-1].split("</think>", 1)[0]
    return score if _LETTER.search(_LATEX_CMD.sub(" ", cot)) else 1.0


def check_sample(completion, finish_reason, n_tokens, row, max_completion_tokens=None, ngram_size=20,
                 max_ngram_repeats=4, lang="en", min_language=1.0, code_timeout=5.0):
    """Run the per-sample checks of REJECT_REASONS in order on one completion. -> (reason or None to keep it,
    rewards: the reward values computed up to the first failure: format, language, accuracy or code).

    completion: the whole assistant turn, starting at <think> (if the prompt already opened it, as the
    R1-Distill template does, put that "<think>\\n" in front). Checks: too_long: not finished by a stop
    (truncated) or more than max_completion_tokens tokens; format: reward.format_reward strict, <think>
    reasoning </think> then a non-empty answer; language: cot_language < min_language; degenerate: some
    ngram_size-gram occurs more than max_ngram_repeats times; incorrect: reward.accuracy_reward against the
    row's `answer` is not 1, or, for a row with `tests`, not every test passes (reward.code_reward)."""
    from reward import accuracy_reward, code_reward, format_reward

    rewards = {}
    if finish_reason != "stop" or (max_completion_tokens and n_tokens > max_completion_tokens):
        return "too_long", rewards
    rewards["format"] = format_reward(completion, "strict")
    if rewards["format"] < 1:
        return "format", rewards
    rewards["language"] = cot_language(completion, lang)
    if rewards["language"] < min_language:
        return "language", rewards
    if max_ngram_count(completion, ngram_size) > max_ngram_repeats:
        return "degenerate", rewards
    if "tests" in row:
        rewards["code"] = code_reward(completion, row["tests"], row.get("timeout", code_timeout))
        ok = rewards["code"] >= 1.0
    elif "answer" in row:
        rewards["accuracy"] = accuracy_reward(completion, row["answer"])
        ok = rewards["accuracy"] >= 1.0
    else:
        raise ValueError(f"problem row has neither 'answer' nor 'tests' to check a completion against: {row!r}"[:300])
    return (None if ok else "incorrect"), rewards


def rejection_reason(completion, finish_reason, n_tokens, row, **limits):
    """Why check_sample drops this completion (a REJECT_REASONS name), or None to keep it."""
    return check_sample(completion, finish_reason, n_tokens, row, **limits)[0]


def think_prefix(tok, prompt_ids):
    """The "<think>..." a prompt ends with when its chat template opens the think block for the model (the
    R1-Distill template's "<｜Assistant｜><think>\\n"), else "": it belongs to the assistant turn."""
    text = tok.decode(prompt_ids)
    i = text.rstrip().rfind("<think>")
    return text[i:] if i >= 0 and text.rstrip().endswith("<think>") else ""


def prompt_messages(row):
    """The conversation a problem row asks: its `messages`, or its `prompt` as one user turn."""
    if isinstance(row.get("messages"), list):
        return [dict(m) for m in row["messages"]]
    return [{"role": "user", "content": row["prompt"]}]


def _select(i, row, samples, prefix, max_per_prompt, prefer, seed, limits):
    """One problem's K samples -> (reason per sample, None for the kept ones; [(sample index, rewards)] kept)."""
    reasons, rewards, good, seen = [], [], [], set()
    for j, c in enumerate(samples):
        text = prefix + c.text
        reason, r = check_sample(text, c.finish_reason, len(c.tokens), row, **limits)
        if reason is None and text in seen:
            reason = "duplicate"
        reasons.append(reason), rewards.append(r)
        if reason is None:
            seen.add(text)
            good.append(j)
    if prefer == "shortest":
        good.sort(key=lambda j: (len(samples[j].tokens), j))  # stable: among equals the earlier sample
    else:  # seeded by the problem index: the same choice whatever the rank split
        random.Random(seed + i).shuffle(good)
    for j in good[max_per_prompt or len(good):]:
        reasons[j] = "over_max_per_prompt"
    return reasons, [(j, rewards[j]) for j in sorted(good[:max_per_prompt or len(good)])]


def rejection_sample(engine, tok, rows, num_samples=4, gen=None, seed=0, template="chat", max_per_prompt=1,
                     prefer="shortest", max_completion_tokens=None, ngram_size=20, max_ngram_repeats=4, lang="en",
                     min_language=1.0, rank=0, world=1, source="", row_files=None, batch_size=32, progress=False):
    """R1's stage-3 rejection sampling: num_samples completions per problem row, kept when check_sample passes
    them, and not an exact duplicate of an earlier kept sample of the same prompt; then at most max_per_prompt
    per prompt (0: no cap), the shortest (prefer="shortest", fewest tokens) or a seeded random choice
    (prefer="random"). -> (kept rows in problem then sample order, report).

    rows: problem rows (`prompt` or `messages`, and `answer` or `tests`), encoded by encode_problem(template);
    gen: Engine.generate keywords (max_new_tokens, temperature, ...). Sample j of problem i has the seed
    seed + i*num_samples + j, as in score_problems, so under torchrun (rank r takes problems r, r+world, ...;
    the results are all-gathered) every rank returns the rows and report of one process.
    Each kept row is an SFT row for train_sft.py: {"messages": prompt turns + the assistant turn (the whole
    completion, <think> block included)}, with provenance: source (checkpoint), source_file and source_row
    (row_files[i] and the row's index in that file), problem_index, sample_index, seed, num_tokens (generated,
    stop token included) and rewards (the values check_sample computed).
    The report: problems, samples, kept, acceptance_rate (kept / samples), problems_with_kept,
    mean_kept_tokens, rejected {reason: count} over REJECT_REASONS, per_source {file: problems, samples, kept,
    rate}, and the settings used."""
    from tqdm import tqdm

    if prefer not in ("shortest", "random"):
        raise ValueError(f"prefer={prefer!r}: expected 'shortest' or 'random'")
    if max_per_prompt < 0:
        raise ValueError(f"max_per_prompt={max_per_prompt}: expected >= 0 (0: no cap)")
    K, gen = num_samples, dict(gen or {})
    files = list(row_files) if row_files is not None else [""] * len(rows)
    if len(files) != len(rows):
        raise ValueError(f"row_files has {len(files)} entries for {len(rows)} rows")
    limits = dict(max_completion_tokens=max_completion_tokens, ngram_size=ngram_size,
                  max_ngram_repeats=max_ngram_repeats, lang=lang, min_language=min_language)
    mine = list(range(rank, len(rows), world))
    results = []  # (problem index, reasons, [(sample index, text, tokens, rewards)])
    bar = tqdm(total=len(rows), desc="reject", disable=rank != 0 or not progress, dynamic_ncols=True, leave=False)
    for s in range(0, len(mine), batch_size):
        idx = mine[s:s + batch_size]
        prompts = [encode_problem(tok, rows[i], template) for i in idx]
        outs = engine.generate(prompts, num_samples=K, seed=[seed + i * K + j for i in idx for j in range(K)], **gen)
        for i, ids, samples in zip(idx, prompts, outs):
            if len(samples) != K:
                raise ValueError(f"engine returned {len(samples)} samples for problem {i}, expected {K}")
            prefix = think_prefix(tok, ids)
            reasons, kept = _select(i, rows[i], samples, prefix, max_per_prompt, prefer, seed, limits)
            results.append((i, reasons, [(j, prefix + samples[j].text, len(samples[j].tokens), r) for j, r in kept]))
        bar.update(min(len(idx) * world, bar.total - bar.n))
    bar.close()
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    results.sort(key=lambda r: r[0])

    source_row, counts = [], Counter()  # each row's index within its own file
    for f in files:
        source_row.append(counts[f])
        counts[f] += 1
    kept_rows, rejected = [], Counter()
    per_source = {f: dict(problems=0, samples=0, kept=0, rate=0.0) for f in dict.fromkeys(files)}
    for i, reasons, kept in results:
        rejected.update(r for r in reasons if r is not None)
        ps = per_source[files[i]]
        ps["problems"] += 1
        ps["samples"] += K
        ps["kept"] += len(kept)
        for j, text, n_tokens, rewards in kept:
            kept_rows.append({"messages": prompt_messages(rows[i]) + [{"role": "assistant", "content": text}],
                              "source": source, "source_file": files[i], "source_row": source_row[i],
                              "problem_index": i, "sample_index": j, "seed": seed + i * K + j,
                              "num_tokens": n_tokens, "rewards": rewards})
    for ps in per_source.values():
        ps["rate"] = ps["kept"] / ps["samples"] if ps["samples"] else 0.0
    n = len(rows) * K
    report = dict(problems=len(rows), samples=n, kept=len(kept_rows), acceptance_rate=len(kept_rows) / n if n else 0.0,
                  problems_with_kept=sum(bool(kept) for _, _, kept in results),
                  mean_kept_tokens=sum(r["num_tokens"] for r in kept_rows) / len(kept_rows) if kept_rows else 0.0,
                  rejected={r: rejected[r] for r in REJECT_REASONS}, per_source=per_source,
                  settings=dict(source=source, num_samples=K, seed=seed, template=template,
                                max_per_prompt=max_per_prompt, prefer=prefer, **limits, gen=gen))
    return kept_rows, report


CONFIG = dict(
    init_from="",  # HF-layout checkpoint dir with tokenizer files; "": TINY_GRPO, else TINY_SFT, else TINY_BASE
    prompt="",  # text to continue; empty: the first problem of --data
    chat=0,  # 1: wrap --prompt as a user turn in the chat template (rows with `messages` always use it)
    num_samples=1,
    max_new_tokens=256,
    temperature=0.8,  # 0 = greedy
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    stop="",  # extra stop string
    seed=1337,
    eval=False,  # score --data with reward.py: pass@1, maj@K, pass@K
    reject=0,  # 1: rejection sampling (R1 stage 3): --num_samples per problem of --data, kept ones -> --out (SFT rows)
    data=DEFAULT_DATA,  # problems JSONL; --reject takes several, comma-separated (the report gives each file's rate)
    out="",  # output JSONL (default out/eval/<data name>.jsonl, --reject: out/reject/<data name>.jsonl + .report.json)
    max_per_prompt=1,  # --reject: keep at most this many samples per problem (0: every one that passes)
    prefer="shortest",  # --reject: which good samples to keep past max_per_prompt: shortest | random (seeded)
    max_completion_tokens=0,  # --reject: length budget in generated tokens (0: none beyond finishing in max_new_tokens)
    ngram_size=20,  # --reject: a sample is degenerate when one ngram_size-gram (words, numbers, symbol runs)...
    max_ngram_repeats=4,  # ...occurs more than this many times in it (a repeated loop)
    lang="en",  # --reject: language the chain of thought must be written in (reward.language_consistency_reward)
    min_language=1.0,  # --reject: least fraction of CoT words in --lang (R1 drops mixed-language CoTs)
    prompt_template="chat",  # --reject: chat | raw | r1zero, for rows with a bare `prompt` (--eval uses --chat)
    batch_size=32,  # problems per generate call in --eval / --reject (x num_samples rows)
    device="auto",
    dtype="auto",  # float32 | bfloat16 | auto (bf16 on CUDA)
    cuda_graphs=1,
    compile=0,  # 1: torch.compile the CUDA-graph decode step (experimental)
)
USAGE = __doc__.split("\n\nIn code")[0]


def main(argv):
    cfg = parse_overrides(argv, CONFIG)
    if not cfg["init_from"]:
        cfg["init_from"] = next((d for d in (TINY_GRPO, TINY_SFT) if os.path.isfile(os.path.join(d, "config.json"))),
                                TINY_BASE)
    if not os.path.isfile(os.path.join(cfg["init_from"], "config.json")):
        if not argv:  # bare `python sample.py` before the tiny model exists
            print(f"no checkpoint at {cfg['init_from']}/ yet (train one with train_sft.py).\nusage:{USAGE}")
            return 0
        raise SystemExit(f"{cfg['init_from']}: no config.json (expected a checkpoint directory)")
    from model import Transformer
    from tokenizer import Tokenizer

    # torchrun: one process per device; --eval and --reject split the problems
    ddp = "RANK" in os.environ and (cfg["eval"] or cfg["reject"])
    rank, world = 0, 1
    device = cfg["device"] if cfg["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if ddp:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg["dtype"]]
    model = Transformer.from_pretrained(cfg["init_from"], dtype=dtype, device=device).eval()
    tok = Tokenizer.from_pretrained(cfg["init_from"])
    engine = Engine(model, tok, cuda_graphs=bool(cfg["cuda_graphs"]) and device.startswith("cuda"),
                    compile=bool(cfg["compile"]))
    gen = dict(max_new_tokens=cfg["max_new_tokens"], temperature=cfg["temperature"], top_k=cfg["top_k"],
               top_p=cfg["top_p"], min_p=cfg["min_p"], stop=[cfg["stop"]] if cfg["stop"] else None)
    if cfg["reject"]:
        return run_reject(engine, tok, cfg, gen, rank, world)
    if cfg["eval"]:
        return run_eval(engine, tok, cfg, gen, rank, world)

    if cfg["prompt"]:
        row = {"prompt": cfg["prompt"]}
    elif os.path.isfile(cfg["data"]):
        row = load_problems(cfg["data"])[0]
        if os.path.isdir(TINY_BASE) and os.path.samefile(cfg["init_from"], TINY_BASE):  # a base model continues its pretraining format
            row = {"prompt": f"Q: {row['prompt']}\nA:"}
    else:
        raise SystemExit("give --prompt=... (or --data with problems)")
    ids = encode_problem(tok, row, bool(cfg["chat"]))
    print(tok.decode(ids), end="", flush=True)
    if cfg["num_samples"] == 1:  # stream: print the new suffix whenever it is whole characters
        got = []
        shown = [0]

        def on_tokens(_, new):
            got.extend(t for t in new if t not in tok.stop_ids)  # as in Completion.text: no stop token
            text = tok.decode(got)
            if not text.endswith("\ufffd"):  # a partial UTF-8 sequence: wait for the rest of it
                print(text[shown[0]:], end="", flush=True)
                shown[0] = len(text)

        c = engine.generate([ids], seed=cfg["seed"], on_tokens=on_tokens, **gen)[0][0]
        print(c.text[shown[0]:] if len(c.text) > shown[0] else "")
        print(f"\n--- finish_reason={c.finish_reason} tokens={len(c.tokens)}")
    else:
        for j, c in enumerate(engine.generate([ids], num_samples=cfg["num_samples"], seed=cfg["seed"], **gen)[0]):
            print(f"\n--- sample {j} (finish_reason={c.finish_reason} tokens={len(c.tokens)})\n{c.text}")
    return 0


def run_eval(engine, tok, cfg, gen, rank, world):
    from data.jsonl import write_jsonl
    from reward import is_equiv

    problems = load_problems(cfg["data"])
    K = cfg["num_samples"]
    t0 = time.time()
    prompts = [encode_problem(tok, row, bool(cfg["chat"])) for row in problems]
    results, n_tokens = score_problems(engine, problems, prompts, K, gen, cfg["seed"], cfg["batch_size"], rank, world)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if rank != 0:
        return 0
    correct = [[s["correct"] for s in rows] for rows in results]
    answers = [[s["pred"] for s in rows] for rows in results]
    dt = time.time() - t0
    out = cfg["out"] or os.path.join("out", "eval", os.path.splitext(os.path.basename(cfg["data"]))[0] + ".jsonl")
    write_jsonl(out, [s for rows in results for s in rows])
    print(f"{cfg['data']}: {len(problems)} problems x {K} samples  "
          f"pass@1 {pass_at_1(correct):.4f}  maj@{K} {maj_at_k(correct, answers, is_equiv):.4f}  "
          f"pass@{K} {pass_at_k(correct):.4f}  ({n_tokens} tokens in {dt:.1f}s, {n_tokens / dt:.0f} tok/s)")
    print(f"wrote {out}")
    return 0


def run_reject(engine, tok, cfg, gen, rank, world):
    import json

    from data.jsonl import write_jsonl

    paths = [p for p in cfg["data"].split(",") if p]
    rows, files = [], []
    for path in paths:
        part = load_problems(path, targets=("answer", "tests"))
        rows += part
        files += [path] * len(part)
    t0 = time.time()
    limits = {k: cfg[k] for k in ("max_per_prompt", "prefer", "ngram_size", "max_ngram_repeats", "lang",
                                  "min_language")}
    kept, report = rejection_sample(engine, tok, rows, cfg["num_samples"], gen, cfg["seed"], cfg["prompt_template"],
                                    max_completion_tokens=cfg["max_completion_tokens"] or None, rank=rank, world=world,
                                    source=cfg["init_from"], row_files=files, batch_size=cfg["batch_size"],
                                    progress=True, **limits)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if rank != 0:
        return 0
    name = "+".join(os.path.splitext(os.path.basename(p))[0] for p in paths)
    out = cfg["out"] or os.path.join("out", "reject", name + ".jsonl")
    write_jsonl(out, kept)
    with open(out + ".report.json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    rejected = ", ".join(f"{r} {n}" for r, n in report["rejected"].items())
    print(f"kept {report['kept']} of {report['samples']} samples ({report['acceptance_rate']:.1%}) from "
          f"{report['problems']} problems x {cfg['num_samples']} ({report['problems_with_kept']} problems with one), "
          f"mean {report['mean_kept_tokens']:.1f} tokens; rejected: {rejected}  ({time.time() - t0:.1f}s)")
    if len(paths) > 1:
        for path, s in report["per_source"].items():
            print(f"  {path}: kept {s['kept']} of {s['samples']} ({s['rate']:.1%})")
    print(f"wrote {out} and {out}.report.json")
    return 0


if __name__ == "__main__":
    rc = main(sys.argv[1:])
    if "RANK" in os.environ:  # torchrun: gloo's worker threads can SIGABRT during interpreter teardown even after
        sys.stdout.flush(), sys.stderr.flush()  # destroy_process_group (pytorch PR 179291), so skip it: all is written
        os._exit(rc or 0)
    sys.exit(rc)
