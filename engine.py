"""
The rollout Engine: batched sampling from a Transformer with a static KV cache. GRPO's rollouts, evaluation,
rejection sampling and on-policy distillation all generate through it; sample.py is its command line.

In code (prompts are token-id lists; out[i][j] is sample j of prompt i):

    engine = Engine(model, tokenizer)
    out = engine.generate([ids_a, ids_b], num_samples=8, max_new_tokens=512, temperature=1.0, seed=0)
    out[0][3].tokens, out[0][3].text, out[0][3].logprobs, out[0][3].finish_reason

What makes it fast, in the order it happens:
  1. all prompts are left-padded into one batch and prefilled once into a static, preallocated KV cache
     (KVCache below: positions count real tokens only, so padding never changes an output);
  2. each prompt's cache rows are fanned out to its num_samples rows (the GRPO group) -- no G-fold prefill;
  3. decoding runs sync_every steps between host syncs (every step with tools: a call is seen at the token that
     completes it, and its answer is fed to that row, token by token, while the others sample); rows that finished
     are compacted away;
  4. on CUDA the one-token decode step is captured in a CUDA graph per batch size (static cache path:
     full-length masked attention, write position held in a device tensor), removing per-op launch cost;
     on the CPU the linears run through oneDNN on prepacked weights (onednn_linears), 1.5-3x faster at the
     skinny matmuls of decoding than F.linear on the machine of bench/README.md.

Randomness is per row: row r draws all its uniforms up front from torch.Generator().manual_seed(seed_r) and
samples by inverse CDF, so a row's tokens depend only on its seed and its logits (and, with tools, on its tools'
answers) -- not on the batch it is in, on which rows finished, or on the device. With generate(seed=s), row
r = i*num_samples + j gets seed_r = s + r; pass a list of seeds to choose them yourself (evaluation uses
s + problem*K + j, GRPO sample_seed).
"""
import collections
import contextlib
import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model import ModelConfig, at_least_fp32, causal_mask

# -----------------------------------------------------------------------------
# the static KV cache


class KVCache:
    """Static, preallocated K/V for batched decoding: [layers, batch, kv_heads, max_seq_len, head_dim].

    All rows write at the same column `pos`; `valid[b, t]` says whether column t of row b holds a real token,
    so left-padded prompts of different lengths share one batch. Positions for RoPE are the count of valid
    tokens before a column, so no output depends on how much padding a row got.
    `select(rows)` reindexes the batch: fan a prefilled prompt out to G samples, or compact away finished rows.
    It works in place inside buffers of `capacity` rows (>= batch_size), so memory and addresses stay fixed;
    `self.k`/`self.v`/`self.valid`/`self.n_valid` are views of the first `batch_size` rows.

    Two ways to attend. Dynamic (default): new tokens see columns [0, pos+T), sliced with the Python int `pos`.
    Static (`static = True`, one new token per row): write at column `pos_t` (a device tensor) and attend over
    all max_seq_len columns with the `valid` mask, so every shape and address is fixed and the decode step
    can be captured in a CUDA graph (Engine below); the caller advances the host `pos` itself and checks
    pos < max_seq_len. The two give the same logits (tests/test_sample.py).
    """

    def __init__(self, cfg: ModelConfig, batch_size, max_seq_len, device=None, dtype=torch.float32, capacity=None):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.max_seq_len = max_seq_len
        self.pos = 0
        self.pos_t = torch.zeros(1, device=device, dtype=torch.long)  # == pos, for the static path
        self.static = False
        self._alloc(max(batch_size, capacity or 0))
        self._view(batch_size)

    def _alloc(self, capacity):
        cfg = self.cfg
        shape = (cfg.num_hidden_layers, capacity, cfg.num_key_value_heads, self.max_seq_len, cfg.head_dim)
        self._k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self._v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self._valid = torch.zeros(capacity, self.max_seq_len, device=self.device, dtype=torch.bool)
        self._n_valid = torch.zeros(capacity, device=self.device, dtype=torch.long)  # next RoPE position per row

    def _view(self, b):
        self.k, self.v = self._k[:, :b], self._v[:, :b]
        self.valid, self.n_valid = self._valid[:b], self._n_valid[:b]

    @property
    def batch_size(self):
        return self.k.shape[1]

    @property
    def capacity(self):
        return self._k.shape[1]

    def prepare(self, attention_mask):
        """Called once per forward, before the layers: record which new columns are real tokens and
        return (position_ids [B, T], attention mask [B, 1, T, pos+T] or [B, 1, 1, max_seq_len] if static)."""
        if self.static:
            return self._prepare_static(attention_mask)
        B, T = attention_mask.shape
        start, end = self.pos, self.pos + T
        if end > self.max_seq_len:
            raise ValueError(f"KVCache overflow: {end} tokens > max_seq_len={self.max_seq_len}")
        new = attention_mask.bool()
        self.valid[:, start:end] = new
        position_ids = self.n_valid[:, None] + new.long().cumsum(-1) - 1
        self.n_valid += new.long().sum(-1)
        return position_ids.clamp(min=0), causal_mask(self.valid[:, :end], start)

    def _prepare_static(self, attention_mask):
        # no Python ints and no host syncs in here: it is recorded once into a CUDA graph and replayed
        # nor does it read or write the host-side `pos` (torch.compile would guard on its value): the
        # caller checks there is room and does `pos += 1` after each step (Engine does both)
        if attention_mask.shape[1] != 1:
            raise ValueError("the static KV-cache path decodes exactly one token per row")
        new = attention_mask.bool()
        self.valid.index_copy_(1, self.pos_t, new)
        self.n_valid += new[:, 0].long()
        position_ids = (self.n_valid[:, None] - 1).clamp(min=0)
        # causality is implied: columns after pos are not valid yet. The query always sees itself (no NaN).
        keys = torch.arange(self.max_seq_len, device=new.device)
        mask = self.valid | (keys == self.pos_t)[None, :]
        return position_ids, mask[:, None, None, :]

    def update(self, layer_idx, k, v):
        if self.static:
            self.k[layer_idx].index_copy_(2, self.pos_t, k)
            self.v[layer_idx].index_copy_(2, self.pos_t, v)
            return self.k[layer_idx], self.v[layer_idx]
        T = k.shape[2]
        self.k[layer_idx, :, :, self.pos:self.pos + T] = k
        self.v[layer_idx, :, :, self.pos:self.pos + T] = v
        return self.k[layer_idx, :, :, :self.pos + T], self.v[layer_idx, :, :, :self.pos + T]

    def advance(self, T):
        self.pos_t += T
        if not self.static:  # static: the caller keeps the host copy (see _prepare_static)
            self.pos += T

    def select(self, rows: torch.Tensor):
        """Keep/repeat batch rows (index tensor). Copies only the filled columns, layer by layer, into the
        first len(rows) rows of the same buffers (grown only if len(rows) > capacity)."""
        rows = rows.to(self._k.device)
        n, end = rows.numel(), self.pos
        src = self._k, self._v, self._valid, self._n_valid
        if n > self.capacity:  # grow: fresh, larger buffers (the only case that allocates)
            self._alloc(n)
        for i in range(self._k.shape[0]):  # indexing with rows gathers (a copy) before the write into the first n rows
            self._k[i, :n, :, :end] = src[0][i, rows, :, :end]
            self._v[i, :n, :, :end] = src[1][i, rows, :, :end]
        self._valid[:n] = src[2][rows]
        self._n_valid[:n] = src[3][rows]
        self._view(n)


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

    Returns (tokens [B], logprobs [B], sample_logprobs [B]). logprobs are log softmax(logits / T) at the chosen
    token: the *unfiltered* temperature-scaled policy (train_grpo recomputes pi_old itself; it logs these against it
    as logp_mismatch). sample_logprobs are
    the log-probs under the distribution the token was actually drawn from, top-k / top-p / min-p filtered and
    renormalised (the rollout importance weights need them, losses.rollout_is_weights): the same tensor as
    logprobs without filtering. Greedy (T=0) reports T=1 log-probs and sample log-probs 0 (the pick was certain).
    Sampling is by inverse CDF over the filtered probabilities: exact, and one uniform per row per token.
    out: optional buffer (fp32; fp64 for an fp64 model) of >= B rows x V for the log-softmax. The Engine reuses one
    across steps: on the CPU a fresh [B, vocab] tensor each step is handed back to the OS by malloc and page-faulted
    in again (~0.6 ms per step at 16 x 32k, ~10% of a small model's step).
    """
    x = logits.to(at_least_fp32(logits.dtype))
    if temperature not in (0, 1):  # not x / 1.0: a full pass over [B, vocab] is ~10% of a small model's CPU step
        x = x / temperature
    logp = torch.log_softmax(x, dim=-1, out=None if out is None else out[:x.shape[0]])
    if temperature == 0:
        tokens = argmax_rows(x)
        picked = logp.gather(-1, tokens[:, None])[:, 0]
        return tokens, picked, torch.zeros_like(picked)
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
    picked = logp.gather(-1, tokens[:, None])[:, 0]
    if 0 < top_k < V or min_p > 0 or top_p < 1:  # renormalised over the kept mass cdf[:, -1]
        return tokens, picked, picked - cdf[:, -1].log().to(picked)
    return tokens, picked, picked


# -----------------------------------------------------------------------------
# the engine


@dataclass
class Completion:
    tokens: list  # generated ids, including the stop token that ended it (GRPO trains on emitting it), tool output too
    text: str  # what the model wrote (the tokens it sampled) decoded, what rewards score: never a tool's output. The
    # stop token's text is left out, a stop *string* is kept (text ends with it)
    logprobs: list  # per token: log softmax(logits / T) of the sampled token (see sample_tokens); 0 on forced tokens
    finish_reason: str  # "stop" (stop token or stop string) or "length" (hit max_new_tokens)
    seed: int = 0  # this row's seed: generate([prompt], seed=this) reproduces the completion
    sample_logprobs: list = field(default_factory=list)  # per token: under the filtered distribution it came from
    loss_mask: list = field(default_factory=list)  # per token: 1 sampled by the model, 0 forced (tool output, glue)
    tool_calls: list = field(default_factory=list)  # per call: {name, arguments, result, error} (tools.Call.record)
    transcript: str = None  # every token decoded: the model's turns and what tools answered between them, as the chat
    # template renders the conversation; text itself when no tool wrote anything

    def __post_init__(self):
        if self.transcript is None:
            self.transcript = self.text


@dataclass
class _Sample:  # host-side bookkeeping of one sample being generated
    seed: int
    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    sample_logprobs: list = field(default_factory=list)
    loss_mask: list = field(default_factory=list)
    finish: str = ""
    by_string: bool = False  # stopped by a stop string (text is cut after it)
    tool_calls: list = field(default_factory=list)
    forced: collections.deque = field(default_factory=collections.deque)  # tokens to feed before sampling again
    segment: int = 0  # index of the first token the model wrote after the last forced ones


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
        self.logits_dtype = at_least_fp32(self.dtype)  # sampled from in fp32 (fp64 for an fp64 model)
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
            out["logits"] = self._step_model(tok, kv_cache=cache, logits_to_keep=1)[:, -1].to(self.logits_dtype)

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
            logits = self.model(tokens[:, None], kv_cache=cache, logits_to_keep=1)[:, -1].to(self.logits_dtype)
        if cache.static:  # the step advanced pos_t on the device; the host copy is ours to keep in step
            cache.pos += 1
        return logits

    # ---- generate ----

    @_eval_mode
    def generate(self, prompts, num_samples=1, max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                 stop=None, seed=None, ignore_eos=False, on_tokens=None, tools=None):
        """prompts: list of token-id lists. Returns out[i][j]: Completion of sample j of prompt i.

        stop: extra stop token ids (ints) and/or stop strings (strs), on top of the tokenizer's stop ids
        (ignore_eos=True drops those, for benchmarks). seed: int (row r gets seed + r), a list with one seed
        per row (len(prompts) * num_samples), or None (drawn from torch's global RNG).
        on_tokens(row, ids): called at each host sync with the row's newly accepted token ids (streaming).
        tools: a tools.ToolUse. When a row's text completes a tool call, the calls run (those of one step at once)
        and their answer is forced into that row, one token a step while the other rows go on sampling; the row
        then samples again after it. Forced tokens count towards max_new_tokens and carry loss_mask 0 and
        log-probs 0. The host syncs every step so that it sees a call at the token that completes it.
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
        rows = [_Sample(s) for s in seeds]
        if max_new_tokens <= 0:
            return [[self._finish(r, stop_strs) for r in rows[i * G:(i + 1) * G]] for i in range(P)]

        cache, logits = self._prefill(prompts, G, max_new_tokens)
        u = None
        if temperature != 0:  # all of a row's uniforms, drawn once from its own generator
            u = torch.stack([torch.rand(max_new_tokens, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
                             for s in seeds]).to(self.device)

        live = list(range(B))  # batch row k holds output row live[k] (None: padding for a graph bucket)
        buckets = _buckets(B)
        step = 0
        logp_buf = torch.empty(B, self.model.config.vocab_size, device=self.device, dtype=self.logits_dtype)
        sync_every = 1 if tools is not None else self.sync_every
        while step < max_new_tokens:
            n = min(sync_every, max_new_tokens - step)
            toks, lps, slps = [], [], []
            for i in range(n):
                t, lp, slp = sample_tokens(logits, None if u is None else u[:, step + i], temperature, top_k, top_p,
                                           min_p, out=logp_buf)
                toks.append(t), lps.append(lp), slps.append(slp)
                if step + i + 1 < max_new_tokens and tools is None:  # the last token never needs to be fed back;
                    logits = self._decode(cache, t)  # with tools it is fed after the host has seen it (below)
            step += n
            same = all(a is b for a, b in zip(lps, slps))  # no filtering: sample_logprobs are the logprobs
            toks, lps = torch.stack(toks, 1).tolist(), torch.stack(lps, 1).tolist()  # the host sync
            slps = lps if same else torch.stack(slps, 1).tolist()
            sampled = []  # rows that took the sample this step (not a forced token)
            for k, r in enumerate(live):
                if r is None or rows[r].finish:
                    continue
                before = len(rows[r].tokens)
                if rows[r].forced:  # this step's token is the next forced one, not the sample
                    rows[r].tokens.append(rows[r].forced.popleft())
                    rows[r].logprobs.append(0.0), rows[r].sample_logprobs.append(0.0), rows[r].loss_mask.append(0)
                else:
                    self._accept(rows[r], toks[k], lps[k], slps[k], stop_ids, stop_strs, lookback)
                    sampled.append(rows[r])
                if on_tokens is not None and len(rows[r].tokens) > before:
                    on_tokens(r, rows[r].tokens[before:])
            if tools is not None:
                self._run_tools(tools, sampled, max_new_tokens)
            keep = [k for k, r in enumerate(live) if r is not None and not rows[r].finish]
            if not keep or step >= max_new_tokens:
                break
            if tools is not None:  # feed each row what it took this step: its sample or a forced token
                logits = self._decode(cache, torch.tensor([rows[r].tokens[-1] if r is not None else 0 for r in live],
                                                          device=self.device))
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
            if not r.finish and tools is not None:  # out of tokens inside a call: recorded, never run
                call = tools.unclosed(self.tokenizer.decode(r.tokens[r.segment:]))
                r.tool_calls += [call.record()] if call is not None else []
            r.finish = r.finish or "length"
        return [[self._finish(r, stop_strs) for r in rows[i * G:(i + 1) * G]] for i in range(P)]

    def _prefill(self, prompts, num_samples, max_new_tokens):
        """Every prompt once, left-padded to the longest, into the KV cache; then each prompt's cache rows fanned out
        to its num_samples rows (prefix sharing: no G-fold prefill). -> (cache, next-token logits [rows, V])."""
        P, L, tok = len(prompts), max(map(len, prompts)), self.tokenizer
        pad = tok.pad_id if tok is not None and tok.pad_id is not None else 0
        ids = torch.tensor([[pad] * (L - len(p)) + list(p) for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        cache = self._get_cache(P, P * num_samples, L + max_new_tokens)
        logits = self.model(ids, attention_mask=mask, kv_cache=cache, logits_to_keep=1)[:, -1].to(self.logits_dtype)
        if num_samples > 1:
            fan = torch.arange(P, device=self.device).repeat_interleave(num_samples)
            cache.select(fan)
            logits = logits[fan]
        cache.static = self.static
        return cache, logits

    def _accept(self, row, toks, lps, slps, stop_ids, stop_strs, lookback):
        """Append a chunk of sampled tokens to a row, up to and including the first stop token / string."""
        for t, lp, slp in zip(toks, lps, slps):
            row.tokens.append(t), row.logprobs.append(lp), row.sample_logprobs.append(slp), row.loss_mask.append(1)
            if t in stop_ids:
                row.finish = "stop"
                return
            if stop_strs:  # in what the model wrote since the last forced tokens, never in a tool's output
                tail = self.tokenizer.decode(row.tokens[max(row.segment, len(row.tokens) - lookback):])
                if any(s in tail for s in stop_strs):
                    row.finish, row.by_string = "stop", True  # the exact cut is made on the full text
                    return

    def _run_tools(self, tools, rows, max_new_tokens):
        """rows: those that sampled a token this step. Where that token completed tool calls, run them (every row's at
        once), queue each answer as the row's next tokens, forced (cut at its token budget), and let the row go on
        (in the chat format the turn ended at its calls: it is no longer finished)."""
        pending = []
        for row in rows:
            if row.by_string or not tools.may_close(row.tokens[-1]):
                continue
            segment = self.tokenizer.decode(row.tokens[row.segment:])
            calls = tools.calls(segment)
            if calls and len(row.tokens) >= max_new_tokens:  # no room left for an answer: recorded, never run,
                row.tool_calls += [dict(c.record(), error=c.error or "no tokens left for the result") for c in calls]
                row.finish = "length"  # and cut by the budget, not ended by the model (--overlong=mask sees it)
            elif calls:
                pending.append((row, segment, calls))
        if not pending:
            return
        calls = [c for _, _, row_calls in pending for c in row_calls]
        made_before = [len(row.tool_calls) + j for row, _, row_calls in pending for j in range(len(row_calls))]
        tools.run(calls, made_before)
        for row, segment, row_calls in pending:
            row.tool_calls += [c.record() for c in row_calls]
            forced = self.tokenizer.encode(tools.respond(segment, row_calls))[:max_new_tokens - len(row.tokens)]
            row.forced.extend(forced)
            row.segment = len(row.tokens) + len(forced)
            row.finish = "" if forced else "length"

    def _finish(self, row, stop_strs):
        text = transcript = None
        if self.tokenizer is not None:
            ids = row.tokens[:-1] if row.finish == "stop" and not row.by_string else row.tokens
            transcript = self.tokenizer.decode(ids)
            if row.by_string:  # cut right after the earliest-ending stop string the model wrote
                last_span = len(self.tokenizer.decode(row.tokens[:row.segment]))  # where the model wrote last
                transcript = _cut_after_stop(transcript, stop_strs, last_span)
            text = transcript
            if 0 in row.loss_mask:  # the sampled spans only (a stop string can only be in the last one)
                text = self.tokenizer.decode([t for t, m in zip(ids, row.loss_mask) if m])
                if row.by_string:
                    text = _cut_after_stop(text, stop_strs)
        return Completion(row.tokens, text, row.logprobs, row.finish or "length", row.seed, row.sample_logprobs,
                          row.loss_mask, row.tool_calls, transcript)


def _cut_after_stop(text, stop_strs, start=0):
    """text up to the end of the earliest-ending stop string found at or after character `start`."""
    return text[:min(text.find(s, start) + len(s) for s in stop_strs if s in text[start:])]


def sample_seed(seed, step, draw, j, group_size):
    """The seed of sample j of a training step's draw-th prompt (GRPO's rollouts, on-policy distillation): a function
    of the global position only, so any number of ranks (and a resumed run) samples exactly the same completions."""
    return (seed * 1_000_003 + step) * 2**24 + draw * group_size + j
