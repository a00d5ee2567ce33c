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
     completes it; the row waits for its answer while the others decode, then the answer enters its cache in one
     forward, _ToolTurns); rows that finished are compacted away;
  4. on CUDA the one-token decode step is captured in a CUDA graph per batch size (static cache path:
     full-length masked attention, write positions held in a device tensor), removing per-op launch cost;
     on the CPU the linears run through oneDNN on prepacked weights (onednn_linears), 1.5-3x faster at the
     skinny matmuls of decoding than F.linear on the machine of bench/README.md.

Randomness is per row: row r draws all its uniforms up front from torch.Generator().manual_seed(seed_r) and
samples by inverse CDF, so a row's tokens depend only on its seed and its logits (and, with tools, on its tools'
answers) -- not on the batch it is in, on which rows finished, or on the device. With generate(seed=s), row
r = i*num_samples + j gets seed_r = s + r; pass a list of seeds to choose them yourself (evaluation uses
s + problem*K + j, GRPO sample_seed). All of this up to rounding: the logits themselves can differ in the last bits
with the shape of the batch that computed them, and with tools that shape follows when calls end (which answers share
a forward, when rows are compacted), so in fp32 a token at a rounding tie may differ between two runs. The tests that
compare such paths run in fp64.
"""
import concurrent.futures
import contextlib
import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model import ModelConfig, at_least_fp32

# -----------------------------------------------------------------------------
# the static KV cache


class KVCache:
    """Static, preallocated K/V for batched decoding: [layers, batch, kv_heads, max_seq_len, head_dim].

    Each row writes at its own columns: `end[b]` is row b's next free column. A forward's T new tokens of row b go to
    columns end[b] .. end[b]+T-1, and its end moves past its last real token (attention_mask says which are real).
    Left-padded prompts therefore all end at column T, their padding columns left as holes, while a right-padded
    block leaves each row's tokens contiguous: the Engine feeds tool answers of different lengths in one forward that
    way, to some rows only (`only(rows)`), while the other rows decode at their own columns between answers.
    `valid[b, t]` says whether column t of row b holds a real token; RoPE positions are the count of real tokens
    before it (`n_valid`), so no output depends on padding or on where in the cache a row's tokens sit.
    Only real tokens are written, but with one token per row every row writes at its end (no data-dependent shapes,
    for CUDA graphs): a row whose token is not real leaves junk there, never valid, overwritten by its next token.
    `select(rows)` reindexes the batch: fan a prefilled prompt out to G samples, or compact away finished rows.
    It works in place inside buffers of `capacity` rows (>= batch_size), so memory and addresses stay fixed;
    `self.k`/`self.v`/`self.valid`/`self.n_valid`/`self.end` are views of the first `batch_size` rows.

    Two ways to attend. Dynamic (default): keys are columns [0, pos), `pos` the furthest end of any row (a host int).
    Static (`static = True`, one new token per row): attend over all max_seq_len columns with the valid mask, so every
    shape and address is fixed and the decode step can be captured in a CUDA graph (Engine below); the caller makes
    sure every row has room (static never reads a device value back to check). The two give the same logits
    (tests/test_sample.py).
    """

    def __init__(self, cfg: ModelConfig, batch_size, max_seq_len, device=None, dtype=torch.float32, capacity=None):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.max_seq_len = max_seq_len
        self.pos = 0  # no row's end is past it: an upper bound (the dynamic path attends over [0, pos))
        self.static = False
        self.rows = None  # the batch rows the next forward feeds, None for all (see only)
        self._alloc(max(batch_size, capacity or 0))
        self._view(batch_size)

    def _alloc(self, capacity):
        cfg = self.cfg
        shape = (cfg.num_hidden_layers, capacity, cfg.num_key_value_heads, self.max_seq_len, cfg.head_dim)
        self._k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self._v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self._valid = torch.zeros(capacity, self.max_seq_len, device=self.device, dtype=torch.bool)
        self._n_valid = torch.zeros(capacity, device=self.device, dtype=torch.long)  # next RoPE position per row
        self._end = torch.zeros(capacity, device=self.device, dtype=torch.long)  # next free column per row

    def _view(self, b):
        self.k, self.v = self._k[:, :b], self._v[:, :b]
        self.valid, self.n_valid, self.end = self._valid[:b], self._n_valid[:b], self._end[:b]

    @property
    def batch_size(self):
        return self.k.shape[1]

    @property
    def capacity(self):
        return self._k.shape[1]

    def reset(self):
        """Empty every row (a kept cache, reused by the next generate)."""
        self.pos, self.static, self.rows = 0, False, None
        self._valid.zero_(), self._n_valid.zero_(), self._end.zero_()

    @contextlib.contextmanager
    def only(self, rows):
        """Forwards inside the block feed the batch rows `rows` (an index tensor) alone, on the dynamic path (their
        blocks may have any length; a CUDA graph's static step is for every row's one token)."""
        static, self.rows, self.static = self.static, rows.to(self._k.device), False
        try:
            yield self
        finally:
            self.rows, self.static = None, static

    def prepare(self, attention_mask):
        """Called once per forward, before the layers: record where the new tokens go and which are real, move each
        row's end, and return (position_ids [B, T], bool attention mask [B, 1, T, keys])."""
        new = attention_mask.bool()
        B, T = new.shape
        every = self.rows is None  # every batch row (views, written in place), or some (only: gathered, put back)
        end, n_valid = (self.end, self.n_valid) if every else (self.end[self.rows], self.n_valid[self.rows])
        cols = end[:, None] + torch.arange(T, device=new.device)  # [B, T]: each new token's column
        real = new.long()
        position_ids = (n_valid[:, None] + real.cumsum(-1) - 1).clamp(min=0)
        count = real.sum(-1)  # each row's end moves to just past its last real token:
        moved = count if T == 1 else torch.where(new.any(-1), T - real.flip(-1).argmax(-1), 0)
        if not self.static:  # no host syncs under a CUDA graph: the caller keeps pos there
            self.pos = max(self.pos, int((end + moved).max()))
            if self.pos > self.max_seq_len:
                raise ValueError(f"KVCache overflow: {self.pos} tokens > max_seq_len={self.max_seq_len}")
        if every and T == 1:  # every row writes at its end (see the class docstring): one scatter, capturable
            self.valid.scatter_(1, cols, new)
            self._at_ends = cols.view(B, 1, 1, 1).expand(B, self.cfg.num_key_value_heads, 1, self.cfg.head_dim)
        else:  # the real tokens alone
            rows = torch.arange(B, device=new.device) if every else self.rows
            b, t = new.nonzero(as_tuple=True)
            self._at_ends, self._at = None, (rows[b], cols[b, t], b, t)
            self.valid[rows[b], cols[b, t]] = True
        if every:
            self.n_valid += count
            self.end += moved
        else:
            self.n_valid[self.rows] = n_valid + count
            self.end[self.rows] = end + moved
        keys = torch.arange(self.max_seq_len if self.static else self.pos, device=new.device)
        valid = (self.valid if every else self.valid[self.rows])[:, None, :keys.numel()]
        q = cols[..., None]  # [B, T, 1]: a query sees the real keys up to its own column, and itself (never NaN)
        if T == 1:  # (no valid key lies past a row's end)
            return position_ids, (valid | (keys == q))[:, None]
        mask = (keys <= q) & valid | (keys == q) | ~new[..., None]  # a padding query sees all (its output is unused)
        return position_ids, mask[:, None]

    def update(self, layer_idx, k, v):
        """Write the new k, v [B, kv_heads, T, head_dim] where prepare said; -> this layer's keys and values."""
        kc, vc = self.k[layer_idx], self.v[layer_idx]
        if self._at_ends is not None:
            kc.scatter_(2, self._at_ends, k), vc.scatter_(2, self._at_ends, v)
        else:
            rows, cols, b, t = self._at
            kc[rows, :, cols] = k.transpose(1, 2)[b, t]
            vc[rows, :, cols] = v.transpose(1, 2)[b, t]
        if self.static:
            return kc, vc
        if self.rows is None:
            return kc[:, :, :self.pos], vc[:, :, :self.pos]
        return kc[self.rows, :, :self.pos], vc[self.rows, :, :self.pos]

    def select(self, rows: torch.Tensor):
        """Keep/repeat batch rows (index tensor). Copies only the filled columns, layer by layer, into the
        first len(rows) rows of the same buffers (grown only if len(rows) > capacity)."""
        rows = rows.to(self._k.device)
        n, used = rows.numel(), self.pos
        src = self._k, self._v, self._valid, self._n_valid, self._end
        if n > self.capacity:  # grow: fresh, larger buffers (the only case that allocates)
            self._alloc(n)
        for i in range(self._k.shape[0]):  # indexing with rows gathers (a copy) before the write into the first n rows
            self._k[i, :n, :, :used] = src[0][i, rows, :, :used]
            self._v[i, :n, :, :used] = src[1][i, rows, :, :used]
        self._valid[:n] = src[2][rows]
        self._n_valid[:n] = src[3][rows]
        self._end[:n] = src[4][rows]
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

    @property
    def model_tokens(self):
        """How many tokens the model wrote itself (sampled: loss_mask 1)."""
        return sum(self.loss_mask)

    @property
    def tool_tokens(self):
        """How many tokens were forced into it: the tools' output and the template's glue around it (loss_mask 0)."""
        return self.loss_mask.count(0)


@dataclass
class _Row:  # host-side bookkeeping of one completion being generated
    seed: int
    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    sample_logprobs: list = field(default_factory=list)
    loss_mask: list = field(default_factory=list)
    finish: str = ""
    by_string: bool = False  # stopped by a stop string (text is cut after it)
    tool_calls: list = field(default_factory=list)
    segment: int = 0  # index of the first token the model wrote after the last tool answer
    waiting: tuple = None  # (segment, calls, futures) while its tool calls run: it samples nothing meanwhile

    @property
    def decoding(self):
        return not self.finish and self.waiting is None

    def append(self, ids, lps=None, slps=None):
        """Sampled tokens with their log-probs, or (lps None) forced ones: loss_mask 0, log-probs 0."""
        self.tokens += ids
        self.logprobs += lps or [0.0] * len(ids)
        self.sample_logprobs += slps or [0.0] * len(ids)
        self.loss_mask += [0 if lps is None else 1] * len(ids)


class _ToolTurns:
    """Everything the Engine does for tools (generate(tools=...)), in one place.

    A row whose sampled token completes tool calls starts them (ToolUse.start: a pool of workers) and waits, sampling
    nothing, while the other rows go on decoding. Once all its calls are answered, the answer -- the tool turn as the
    chat template renders it, or the output block -- is appended to it, forced (loss_mask 0), cut at its token budget,
    and fed to it in one forward together with the other answers that arrived by then (Engine._feed); the row then
    samples again. Its tokens depend neither on when the answer came nor on which rows it came with: a row draws its
    uniforms by its own token count, and its cache rows are its own (KVCache)."""

    def __init__(self, tools, tokenizer, max_new_tokens):
        self.tools, self.tok, self.max_new_tokens = tools, tokenizer, max_new_tokens

    def after_sample(self, rows):
        """rows: those that took a sampled token this step. Start the calls it completed; or record a call left open
        by a row the budget just cut."""
        for row in rows:
            may_close = not row.by_string and self.tools.may_close(row.tokens[-1])
            segment = self.tok.decode(row.tokens[row.segment:]) if may_close or row.finish == "length" else ""
            calls = self.tools.calls(segment) if may_close else []
            if calls and len(row.tokens) < self.max_new_tokens:  # in the chat format the turn ended at its calls
                made = len(row.tool_calls)
                row.finish, row.waiting = "", (segment, calls, self.tools.start(calls, range(made, made + len(calls))))
            elif calls:  # no room left for an answer: recorded, never run, and the row was cut by the budget, not
                # ended by the model (a "length" finish, which --overlong=mask sees)
                row.tool_calls += [dict(c.record(), error=c.error or "no tokens left for the result") for c in calls]
                row.finish = "length"
            elif row.finish == "length" and (call := self.tools.unclosed(segment)) is not None:
                row.tool_calls.append(call.record())  # out of tokens inside a call: recorded, never run

    def answered(self, batch, block):
        """batch: (batch row, _Row) pairs. Append the answer of each row whose calls are all done (after waiting for
        the first if block) -> [(batch row, answer ids)]; an answer that fills the budget ends its row (not fed)."""
        waiting = [(k, row) for k, row in batch if row.waiting is not None]
        running = [f for _, row in waiting for f in row.waiting[2] if not f.done()]
        while block and running and not any(all(f.done() for f in row.waiting[2]) for _, row in waiting):
            concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            running = [f for f in running if not f.done()]
        appended = []
        for k, row in waiting:
            segment, calls, futures = row.waiting
            if not all(f.done() for f in futures):
                continue
            for f in futures:
                f.result()  # a broken sandbox or tool raises here and stops the run
            row.waiting = None
            row.tool_calls += [c.record() for c in calls]
            ids = self.tok.encode(self.tools.respond(segment, calls))[:self.max_new_tokens - len(row.tokens)]
            row.append(ids)
            row.segment = len(row.tokens)
            row.finish = "length" if len(row.tokens) >= self.max_new_tokens else ""
            appended.append((k, ids))
        return appended


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
        c.reset()
        c._view(prefill_rows)
        return c

    def _graph(self, cache, b):
        """The one-token decode step at batch b (cache rows [0, b)), captured once: (replay, tokens in, fed in, out)."""
        if b in self._graphs:
            return self._graphs[b]
        saved = (cache.end.clone(), cache.valid.clone(), cache.n_valid.clone())

        def restore():  # warmup really runs the step (moves end, writes valid/n_valid): undo it
            cache.end.copy_(saved[0]), cache.valid.copy_(saved[1]), cache.n_valid.copy_(saved[2])

        tok, out = torch.zeros(b, 1, dtype=torch.long, device=self.device), {}
        fed = torch.ones_like(tok)

        def step():  # static shapes, no host syncs: every tensor it touches lives at a fixed address
            logits = self._step_model(tok, attention_mask=fed, kv_cache=cache, logits_to_keep=1)
            out["logits"] = logits[:, -1].to(self.logits_dtype)

        self._graphs[b] = (self._capture(step, restore), tok, fed, out)
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

    def _decode(self, cache, tokens, fed=None):
        """Feed one token per row (where fed [b] is true; all rows if None); -> next-token logits [b, V]. A row not fed
        keeps its cache as it was, and its logits are junk."""
        fed = torch.ones_like(tokens) if fed is None else fed
        if self.cuda_graphs:
            replay, tok_in, fed_in, out = self._graph(cache, tokens.shape[0])
            tok_in.copy_(tokens[:, None]), fed_in.copy_(fed[:, None])
            replay()
            logits = out["logits"]
        else:
            logits = self.model(tokens[:, None], attention_mask=fed[:, None], kv_cache=cache, logits_to_keep=1)
            logits = logits[:, -1].to(self.logits_dtype)
        if cache.static:  # the host's bound on every row's end (the static step reads nothing back)
            cache.pos = min(cache.pos + 1, cache.max_seq_len)
        return logits

    def _feed(self, cache, logits, answers):
        """answers: (batch row, token ids) pairs. Feed them in one forward, right-padded, to those rows alone (at
        their own cache columns); -> logits with theirs now the next-token logits after their last token."""
        rows = torch.tensor([k for k, _ in answers], device=self.device)
        T = max(len(ids) for _, ids in answers)
        ids = torch.tensor([a + [0] * (T - len(a)) for _, a in answers], device=self.device)
        real = torch.tensor([[1] * len(a) + [0] * (T - len(a)) for _, a in answers], device=self.device)
        with cache.only(rows):
            hidden = self.model(ids, attention_mask=real, kv_cache=cache, return_hidden=True)
        last = hidden[torch.arange(len(answers), device=self.device), real.sum(-1) - 1]
        return logits.index_copy(0, rows, self.model.lm_head(last).to(self.logits_dtype))

    # ---- generate ----

    @_eval_mode
    def generate(self, prompts, num_samples=1, max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                 stop=None, seed=None, ignore_eos=False, on_tokens=None, tools=None):
        """prompts: list of token-id lists. Returns out[i][j]: Completion of sample j of prompt i.

        stop: extra stop token ids (ints) and/or stop strings (strs), on top of the tokenizer's stop ids
        (ignore_eos=True drops those, for benchmarks). seed: int (row r gets seed + r), a list with one seed
        per row (len(prompts) * num_samples), or None (drawn from torch's global RNG).
        on_tokens(row, ids): called at each host sync with the row's newly accepted token ids (streaming).
        tools: a tools.ToolUse. A row whose text completes tool calls waits for their answer while the other rows
        decode; the answer is then forced into it, in one forward, and it samples again (_ToolTurns). Forced tokens
        count towards max_new_tokens and carry loss_mask 0 and log-probs 0. The host syncs every step, so that it
        sees a call at the token that completes it.
        """
        P, G = len(prompts), num_samples
        if P == 0:
            return []
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty (need at least one token)")
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        seeds = [seed + r for r in range(P * G)] if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != P * G:
            raise ValueError(f"got {len(seeds)} seeds for {P} prompts x {G} samples = {P * G} rows")
        stops = self._stops(stop, ignore_eos)
        rows = [_Row(s) for s in seeds]
        if max_new_tokens > 0:
            turns = None if tools is None else _ToolTurns(tools, self.tokenizer, max_new_tokens)
            sampling = (temperature, top_k, top_p, min_p)
            self._decode_rows(prompts, rows, max_new_tokens, sampling, stops, on_tokens, turns)
        return [[self._finish(r, stops[1]) for r in rows[i * G:(i + 1) * G]] for i in range(P)]

    def _stops(self, stop, ignore_eos):
        """-> (stop ids, stop strings, how many tokens cover the longest stop string: >= 1 byte each)."""
        tok = self.tokenizer
        stop = [stop] if isinstance(stop, (str, int)) else list(stop or [])
        stop_ids = set() if ignore_eos or tok is None else set(tok.stop_ids)
        stop_ids |= {s for s in stop if isinstance(s, int)}
        stop_strs = [s for s in stop if isinstance(s, str) and s]
        if stop_strs and tok is None:
            raise ValueError("stop strings need a tokenizer")
        return stop_ids, stop_strs, 4 * max(map(len, stop_strs), default=0) + 1

    def _decode_rows(self, prompts, rows, max_new_tokens, sampling, stops, on_tokens, turns):
        """Generate every row to its end, in place: sample a chunk (sync_every tokens, 1 with tools), sync, take each
        decoding row's tokens, start and answer tool calls, feed the taken tokens, compact away finished rows."""
        cache, logits = self._prefill(prompts, len(rows) // len(prompts), max_new_tokens)
        u = None
        if sampling[0] != 0:  # all of a row's uniforms, drawn once from its own generator
            u = torch.stack([torch.rand(max_new_tokens, dtype=torch.float64, generator=torch.Generator().manual_seed(
                r.seed)) for r in rows]).to(self.device)
        live = list(range(len(rows)))  # batch row k holds rows[live[k]] (None: padding for a graph bucket)
        buf = torch.empty(len(rows), self.model.config.vocab_size, device=self.device, dtype=self.logits_dtype)
        while any(r is not None and not rows[r].finish for r in live):
            batch = [(k, rows[r]) for k, r in enumerate(live) if r is not None]
            taken = [len(rows[r].tokens) if r is not None else 0 for r in live]
            fed = set()
            if any(row.decoding for _, row in batch):
                n = 1 if turns else min(self.sync_every, max_new_tokens - max(taken))
                # each row's next uniform is at its token count; without tools every decoding row's is the same
                first = None if u is None else torch.tensor(taken) if turns else torch.full((len(live),), max(taken))
                toks, sampled, logits = self._sample(cache, logits, u, first, n, sampling, buf)
                for k, row in batch:
                    if row.decoding:
                        self._accept(row, *toks[k], stops, max_new_tokens)
                        if on_tokens is not None:
                            on_tokens(live[k], row.tokens[taken[k]:])
                        fed.add(k)
                if turns:
                    turns.after_sample([row for k, row in batch if k in fed])
                fed = {k for k in fed if not rows[live[k]].finish}
            if fed:  # each row that took a token feeds it; with tools the others are masked (waiting, or done;
                # without, every row is fed: all have the same end, and a done row's junk is never read)
                masked = turns is not None and len(fed) < len(live)
                is_fed = torch.tensor([k in fed for k in range(len(live))]).to(self.device) if masked else None
                logits = self._decode(cache, sampled, is_fed)
            answers = turns.answered(batch, block=not fed) if turns else []
            for k, ids in answers if on_tokens is not None else []:
                on_tokens(live[k], ids)
            answers = [(k, ids) for k, ids in answers if not rows[live[k]].finish]  # (a full budget: not fed)
            if answers:
                logits = self._feed(cache, logits, answers)
            live, logits, u = self._compact(cache, live, rows, logits, u)

    def _sample(self, cache, logits, u, first, n, sampling, buf):
        """n tokens for every batch row, fed back between them (no host sync inside): -> (per batch row its (tokens,
        logprobs, sample_logprobs) lists, the last tokens sampled [rows] (not fed yet), the logits after the last fed).
        Row k's i-th token uses its uniform first[k] + i (greedy: no uniforms, first None)."""
        first = None if first is None else first.to(self.device)
        toks, lps, slps = [], [], []
        for i in range(n):
            ui = None if u is None else u.gather(1, (first + i).clamp(max=u.shape[1] - 1)[:, None])[:, 0]
            t, lp, slp = sample_tokens(logits, ui, *sampling, out=buf)
            toks.append(t), lps.append(lp), slps.append(slp)
            if i + 1 < n:  # the chunk's last token is fed after the host has seen it (tools, stops)
                logits = self._decode(cache, t)
        same = all(a is b for a, b in zip(lps, slps))  # no filtering: sample_logprobs are the logprobs
        last = toks[-1]
        toks, lps = torch.stack(toks, 1).tolist(), torch.stack(lps, 1).tolist()  # the host sync
        slps = lps if same else torch.stack(slps, 1).tolist()
        return list(zip(toks, lps, slps)), last, logits

    def _compact(self, cache, live, rows, logits, u):
        """Once compact_frac of the batch rows have finished, drop them (cache, logits, uniforms); under CUDA graphs
        round up to a bucket size (one graph each), padding with dummy rows."""
        keep = [k for k, r in enumerate(live) if r is not None and not rows[r].finish]
        if not keep or len(live) - len(keep) < max(1, self.compact_frac * len(live)):
            return live, logits, u
        target = next(b for b in _buckets(len(rows)) if b >= len(keep)) if self.cuda_graphs else len(keep)
        if target >= len(live):
            return live, logits, u
        idx = torch.tensor(keep + [keep[0]] * (target - len(keep)), device=self.device)
        cache.select(idx)
        live = [live[k] for k in keep] + [None] * (target - len(keep))
        return live, logits[idx], None if u is None else u[idx]

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

    def _accept(self, row, toks, lps, slps, stops, max_new_tokens):
        """Append a chunk of sampled tokens to a row, up to and including the first stop token / string; a row that
        reaches max_new_tokens without one finishes as "length"."""
        stop_ids, stop_strs, lookback = stops
        for t, lp, slp in zip(toks, lps, slps):
            row.append([t], [lp], [slp])
            if t in stop_ids:
                row.finish = "stop"
                return
            if stop_strs:  # in what the model wrote since the last forced tokens, never in a tool's output
                tail = self.tokenizer.decode(row.tokens[max(row.segment, len(row.tokens) - lookback):])
                if any(s in tail for s in stop_strs):
                    row.finish, row.by_string = "stop", True  # the exact cut is made on the full text
                    return
            if len(row.tokens) >= max_new_tokens:
                row.finish = "length"
                return

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
