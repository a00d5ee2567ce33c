"""
Supervised fine-tuning for nanoR1 -- and plain language-model pretraining and reward-model training with the
same loop.

R1's cold start, its stage-3 SFT on rejection-sampled data and sequence-level distillation are all this:
next-token cross-entropy on the assistant tokens of chat transcripts. `--mode=pretrain` puts the loss on
every token of raw text instead, which is how the embedded tiny base model (data/tiny/model) was made.
`--mode=rm` trains a reward model (model.RewardModel, for R1's stage-4 RL on general prompts) on preference
pairs with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected), and reports pairwise accuracy.

Launch:
    # default: cold-start SFT of the tiny model on the shipped CoT data, CPU, a few minutes
    python train_sft.py
    # a real model, two data files mixed 70/30, bf16 on one GPU
    python train_sft.py --init_from=/models/Qwen2.5-1.5B-Instruct --data=a.jsonl:0.7,b.jsonl:0.3 \\
        --max_seq_len=4096 --batch_size=4 --grad_accum=8 --lr=1e-5 --min_lr=1e-6 --out_dir=out/sft_1.5b
    # the same on 8 GPUs (each rank collates only its own rows; rank 0 logs and saves)
    torchrun --standalone --nproc_per_node=8 train_sft.py --init_from=... --batch_size=4 --grad_accum=1
    # a model whose AdamW state does not fit one GPU: FSDP2 shards weights, gradients and optimizer state
    torchrun --standalone --nproc_per_node=8 train_sft.py --init_from=/models/Qwen2.5-7B --fsdp=1 ...
    # continue a run that stopped or was killed, exactly where its last checkpoint left off
    python train_sft.py --out_dir=out/sft --resume=1
    # language-model mode from random init (data/tiny/model was made so: exact commands in its README.md)
    python train_sft.py --mode=pretrain --init_from=scratch --tokenizer=data/tiny/tokenizer \\
        --model_config='{"hidden_size":192,"intermediate_size":512,"num_hidden_layers":4}' \\
        --data=data/tiny/pretrain.jsonl --out_dir=out/tiny_base --batch_size=16 --lr=3e-3
    # reward model from the SFT checkpoint (fresh score head) on chosen/rejected pairs; saved as
    # Qwen2ForSequenceClassification. --init_from=RM_DIR continues an existing reward model instead.
    python train_sft.py --mode=rm --init_from=out/sft/ckpt --data=prefs.jsonl --out_dir=out/rm \\
        --epochs=1 --lr=1e-5 --min_lr=1e-6 --weight_decay=0 --batch_size=8

Config: every module-level value below is overridable with --key=value (bools are 0/1).

Data: JSONL rows with "messages" (chat) or "prompt"/"completion" (sft), or "text" (pretrain; .txt files
are one document each), or a pair (rm): "prompt" (a string: the user turn, or a message list) or "messages"
(the conversation before the response), plus "chosen" and "rejected", each a response string or a message list
whose last assistant turn is the response (with no prompt/messages the list is the whole conversation, as in
common preference sets). Each side is chat-templated (the response as the final assistant turn, its <think> kept)
and scored at its last token; a pair is one example, never packed, and one with a side over max_seq_len is
dropped (counted). The chat template of the tokenizer being trained is applied and only assistant
content + the turn-closing token are learned. `--data=a.jsonl:0.7,b.jsonl:0.3` mixes files: a weight is
the fraction of each epoch's example stream drawn from that file (an epoch has as many examples as all
files together; a file that is too small for its share is repeated as whole shuffled passes plus a
partial one). With no weights each row is seen once per epoch. Epoch e's order is a deterministic
function of (seed, e), which is what makes --resume exact: the checkpoint only stores (epoch, position).

Loss normalisation: every optimizer step divides the summed token loss by the number of target tokens
in the whole step (all micro-batches of all ranks; the count is all-reduced first). So the gradient is
the same whatever the split into ranks x grad_accum x batch_size, and a packed row weighs its tokens
exactly like the unpacked examples would. rm: the pair losses are summed and divided by the step's pair count.

--fsdp=1 (under torchrun) replaces the DDP wrapper with FSDP2 (train_common.shard_model): the same gradient, the same
step, ordinary HF-layout checkpoints (gathered onto rank 0), and a resumable optimizer state (gathered whole too).
"""
import bisect
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import parse_overrides
from model import ModelConfig, RewardModel, Transformer, _weight_files, chunked_cross_entropy
from tokenizer import Tokenizer
from train_common import (Config, MetricsFile, all_rng_states, exit_if_torchrun, find_checkpoint, full_state_dict,
                          load_optimizer_state, load_trainer_state, lr_at, make_optimizer, optimizer_state,
                          parse_data_spec, peak_flops, read_rows, save_checkpoint, save_or_stop, set_rng_state,
                          setup_runtime, shard_model, teardown)

# -----------------------------------------------------------------------------
# config (defaults = cold-start SFT of the embedded tiny model on CPU)
_globals_before_config = set(globals())
init_from = "data/tiny/model"  # HF-layout checkpoint dir, or "scratch" (random init from --model_config)
model_config = ""  # scratch only: JSON dict of ModelConfig fields, or a path to a config.json
tokenizer = ""  # tokenizer dir; "" -> the init_from dir
data = "data/tiny/coldstart.jsonl"  # comma-separated files, each optionally path:weight
eval_data = ""  # held-out file(s); "" -> hold out eval_frac of every training file
eval_frac = 0.05
eval_max_examples = 256  # cap on held-out examples, so eval stays cheap
mode = "sft"  # sft: loss on assistant tokens | pretrain: loss on all tokens of "text" rows | rm: reward model
out_dir = "out/sft"
max_seq_len = 512  # longer sft examples are truncated (counted + reported); pretrain docs are split
pack = 1  # best-fit packing of several examples per row (0: one example per row, padded); rm: always 0
batch_size = 8  # rows per micro-batch per rank
grad_accum = 1  # micro-batches per optimizer step
max_steps = 0  # optimizer steps; 0 -> derived from epochs
epochs = 6.0  # the default cold start: ~2.5 min on 2 CPU cores, eval loss 0.13, greedy pass@1 15% (README)
lr = 1e-3
min_lr = 1e-4  # cosine decays to this
warmup_steps = 10
weight_decay = 0.1  # decoupled (AdamW); matrices and embeddings only, never norms or biases
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 disables
dtype = "auto"  # auto: bf16 autocast (fp32 master weights) on cuda, fp32 on cpu | float32 | bfloat16
device = "auto"  # auto | cpu | cuda
compile = 0  # torch.compile the model
grad_checkpointing = 0  # recompute each block in backward: less activation memory, ~30% more compute
fsdp = 0  # 1 (torchrun): FSDP2 shards parameters, gradients and AdamW state over the ranks instead of DDP replicas
ce_chunk = 1024  # positions per chunk of the fused cross-entropy (peak logits memory = ce_chunk x vocab)
eval_every = 50  # 0 disables periodic eval (a final eval still runs when there is a held-out split)
save_every = 0  # 0 -> only at the end
log_every = 10  # metrics.jsonl line (+ MFU line on GPU) every this many steps; the bar updates every step
resume = 0  # 1: continue from out_dir/ckpt (model, optimizer, step, RNG, data position)
seed = 1337
skip_bad_rows = 0  # 1: skip (and count) malformed rows instead of stopping at the first one
stop_after = 0  # >0: exit right after step k without the final save, like a crash (resume tests)
progress = 1  # tqdm progress bar on rank 0
CONFIG_KEYS = [k for k in globals() if k not in _globals_before_config and not k.startswith("_")]
# -----------------------------------------------------------------------------


def configure(argv):
    """Module defaults overridden by --key=value arguments, typed like the default (bools as 0/1)."""
    cfg = Config(parse_overrides(argv, {k: globals()[k] for k in CONFIG_KEYS}))
    if cfg.mode not in ("sft", "pretrain", "rm"):
        raise SystemExit(f"--mode={cfg.mode}: expected sft, pretrain or rm")
    if cfg.mode == "rm":
        cfg["pack"] = 0  # a pair is scored at each side's last token: one sequence per row
    return cfg


# -----------------------------------------------------------------------------
# data: files -> (ids, mask) examples. mask[i] = 1 means token i is predicted (from token i-1).


def row_to_example(row, tok, mode, where):
    """One JSONL row -> (ids, mask), or (chosen ids, rejected ids) in rm mode. Raises ValueError('file:line: why')
    on anything unusable."""
    if mode == "rm":
        return tuple(pair_ids(row, tok, where))
    if mode == "pretrain":
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: pretrain rows need a non-empty 'text' string")
        ids = tok.encode(text) + [tok.eos_id]  # eos so the model learns where a document ends
        return ids, [1] * len(ids)
    if "messages" in row:
        messages = row["messages"]
    elif "prompt" in row and "completion" in row:
        p, c = row["prompt"], row["completion"]
        messages = ([{"role": "user", "content": p}] if isinstance(p, str) else list(p)) + \
                   ([{"role": "assistant", "content": c}] if isinstance(c, str) else list(c))
    else:
        raise ValueError(f"{where}: expected a 'messages' list or 'prompt' + 'completion' "
                         f"(got keys {sorted(row)})")
    if not isinstance(messages, list) or not any(isinstance(m, dict) and m.get("role") == "assistant"
                                                 for m in messages):
        raise ValueError(f"{where}: no assistant turn, so nothing to learn")
    try:
        ids, mask = tok.encode_chat_with_mask(messages)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if not any(mask[1:]):
        raise ValueError(f"{where}: the assistant turns are empty")
    return ids, mask


def pair_ids(row, tok, where):
    """A preference row -> [chosen ids, rejected ids]: each side as the whole chat-templated conversation (context +
    the response as the final assistant turn, <think> kept: what the policy generates), for RewardModel to score at
    its last token. A side may be a string (the response) or a message list: the rest of the conversation after the
    context, or the whole conversation when the row has no prompt/messages."""
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise ValueError(f"{where}: pair row missing {' and '.join(map(repr, missing))} (rm rows need 'chosen' and "
                         f"'rejected', got keys {sorted(row)})")
    context = row.get("messages", row.get("prompt"))
    if isinstance(context, str):
        context = [{"role": "user", "content": context}]
    if context is not None and not isinstance(context, list):
        raise ValueError(f"{where}: 'prompt' must be a string or a message list, 'messages' a message list")
    out = []
    for key in ("chosen", "rejected"):
        side = row[key]
        if isinstance(side, str):
            if context is None:
                raise ValueError(f"{where}: {key!r} is a string but the row has no 'prompt' or 'messages'")
            messages = context + [{"role": "assistant", "content": side}]
        elif isinstance(side, list):
            messages = (context or []) + side
        else:
            raise ValueError(f"{where}: {key!r} must be a string or a message list, got {type(side).__name__}")
        last = messages[-1] if messages else None
        if not isinstance(last, dict) or last.get("role") != "assistant" or not str(last.get("content", "")).strip():
            raise ValueError(f"{where}: {key!r} does not end in a non-empty assistant turn")
        try:
            out.append(reward_model_input(tok, messages))
        except ValueError as e:
            raise ValueError(f"{where}: {key}: {e}") from None
    return out


def reward_model_input(tok, messages):
    """What a RewardModel reads, in training (--mode=rm) and when train_grpo --reward_model scores rollouts: the
    whole chat-templated conversation, ending in the assistant turn being scored (closed as the template closes it:
    `<|im_end|>\n` in ChatML); the score is taken at its last token."""
    ids, _ = tok.encode_chat_with_mask(messages)
    return ids


def fit_length(ids, mask, max_len, mode):
    """-> list of examples that fit in max_len, and whether anything was truncated away.
    pretrain: split into windows overlapping by one token, so every token is still predicted once.
    sft: keep the first max_len tokens (the caller counts it; an example with no learned token left
    is dropped and counted separately, never trained on silently).
    rm: (ids, mask) is (chosen ids, rejected ids); a pair with a side over max_len is dropped (no pieces), since
    cutting a response would change what is scored."""
    if mode == "rm":
        too_long = max(len(ids), len(mask)) > max_len
        return ([] if too_long else [(ids, mask)]), too_long
    if len(ids) <= max_len:
        return [(ids, mask)], False
    if mode == "pretrain":
        step = max_len - 1
        return [(ids[s:s + max_len], mask[s:s + max_len]) for s in range(0, len(ids) - 1, step)], False
    return [(ids[:max_len], mask[:max_len])], True


def tokenize_rows(rows, indices, tok, cfg):
    """{row index: ("ok", pieces, truncated) | ("error", message)} for the given rows; pieces are
    (ids int32, mask bool) numpy arrays: 5 bytes a token instead of a Python list's ~30."""
    out = {}
    for i in indices:
        where, row = rows[i]
        try:
            ids, mask = row_to_example(row, tok, cfg.mode, where)
        except ValueError as e:
            out[i] = ("error", str(e))
            continue
        pieces, truncated = fit_length(ids, mask, cfg.max_seq_len, cfg.mode)
        second = np.int32 if cfg.mode == "rm" else bool  # rm: the rejected side's ids, not a mask
        out[i] = ("ok", [(np.asarray(a, np.int32), np.asarray(m, second)) for a, m in pieces if len(a) >= 2], truncated)
    return out


def load_examples(paths, tok, cfg, log=print, rank=0, world=1):
    """Tokenise every file. -> list (one per file) of example lists, and a stats dict.
    Under DDP each rank tokenises only rows rank, rank+world, ... (its shard) and the ranks swap results,
    so every rank ends with the same examples in the same order (one global packing plan, which is what
    makes N ranks equal one process) for 1/world of the tokenising work."""
    out, stats = [], dict(rows=0, skipped=0, truncated=0, dropped=0)
    for path in paths:
        rows = read_rows(path, cfg.skip_bad_rows)
        done = tokenize_rows(rows, range(rank, len(rows), world), tok, cfg)
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, done)
            done = {i: r for part in parts for i, r in part.items()}
        examples, truncated_where = [], []
        for i, (where, _) in enumerate(rows):  # file order, whichever rank tokenised the row
            stats["rows"] += 1
            result = done[i]
            if result[0] == "error":  # every rank raises the same first error: none is left waiting
                if not cfg.skip_bad_rows:
                    raise ValueError(result[1])
                stats["skipped"] += 1
                continue
            _, pieces, truncated = result
            if truncated:
                stats["truncated"] += 1
                truncated_where.append(where)
                if not pieces or not pieces[0][1][1:].any():
                    stats["dropped"] += 1  # the answer was entirely past max_seq_len (rm: a side was too long)
                    continue
            examples += pieces
        if truncated_where:
            log(f"warning: {len(truncated_where)} example(s) in {path} longer than max_seq_len={cfg.max_seq_len} "
                f"were {'dropped' if cfg.mode == 'rm' else 'truncated'}, e.g. {', '.join(truncated_where[:3])}")
        if not examples:
            raise ValueError(f"{path}: no usable examples")
        out.append(examples)
    if stats["dropped"] and cfg.mode != "rm":
        log(f"warning: {stats['dropped']} truncated example(s) lost all their assistant tokens and were dropped")
    if stats["skipped"]:
        log(f"warning: skipped {stats['skipped']} bad row(s) (--skip_bad_rows=1)")
    return out, stats


# -----------------------------------------------------------------------------
# packing and batching


def pack_best_fit(lengths, max_len):
    """Best-fit decreasing: longest first, each into the open row with the least room that still fits.
    -> list of rows, each a list of indices into lengths. Rows hold <= max_len tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows, free = [], []  # free: sorted (room left, row index) of rows that still have room
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            room, r = free.pop(j)
        else:
            room, r = max_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


def epoch_rows(sources, weights, max_len, seed, epoch, do_pack):
    """The packed rows of one epoch, a deterministic function of (seed, epoch). Each row is a list of
    examples. weights None -> every example once; else weight w_i -> round(w_i * total) draws from file i."""
    rng = np.random.default_rng([seed, epoch])
    total = sum(len(s) for s in sources)
    stream = []
    for src, w in zip(sources, weights or [None] * len(sources)):
        n = len(src) if w is None else round(w * total)
        while n > 0:  # whole shuffled passes, then part of one: repeats are spread evenly
            take = rng.permutation(len(src))[:n]
            stream += [src[i] for i in take]
            n -= len(take)
    if do_pack:
        rows = [[stream[i] for i in row] for row in pack_best_fit([len(ex[0]) for ex in stream], max_len)]
    else:
        rows = [[ex] for ex in stream]
    return [rows[i] for i in rng.permutation(len(rows))]


class RowStream:
    """Endless stream of packed rows across epochs; its position is (epoch, index) -- all a resume needs."""

    def __init__(self, sources, weights, max_len, seed, do_pack, epoch=0, pos=0):
        self.sources, self.weights, self.max_len, self.seed, self.do_pack = sources, weights, max_len, seed, do_pack
        self.epoch, self.pos, self._rows = epoch, pos, None

    def rows_in_epoch(self, epoch):
        return epoch_rows(self.sources, self.weights, self.max_len, self.seed, epoch, self.do_pack)

    def take(self, n):
        out = []
        while len(out) < n:
            if self._rows is None:
                self._rows = self.rows_in_epoch(self.epoch)
            chunk = self._rows[self.pos:self.pos + n - len(out)]
            out += chunk
            self.pos += len(chunk)
            if self.pos >= len(self._rows):  # a step may straddle two epochs
                self.epoch, self.pos, self._rows = self.epoch + 1, 0, None
        return out

    def state(self):
        return {"epoch": self.epoch, "pos": self.pos}


def collate(rows, pad_id, pad_to=0):
    """Packed rows -> tensors, padded to the longest row (or to pad_to: static shapes under compile).
    targets[t] = next token when it is learned and in the same document,
    else -100; position_ids restart at 0 for each document; doc_ids (-1 = padding) build the mask."""
    T = max(pad_to, max(sum(len(ids) for ids, _ in row) for row in rows))
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), -100, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    doc_ids = torch.full((B, T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        off = 0
        for d, (ids, mask) in enumerate(row):
            n = len(ids)
            ids_t, mask_t = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
            input_ids[b, off:off + n] = ids_t
            targets[b, off:off + n - 1] = torch.where(mask_t[1:], ids_t[1:], -100)
            position_ids[b, off:off + n] = torch.arange(n)
            doc_ids[b, off:off + n] = d
            off += n
    return {"input_ids": input_ids, "targets": targets, "position_ids": position_ids, "doc_ids": doc_ids}


def packed_attention_mask(doc_ids):
    """[B, T] doc ids -> [B, 1, T, T] bool block-diagonal causal mask; None when every row is one
    unpadded document (then plain causal attention, the fast kernel path, is exactly right).
    Padding (-1) forms its own block, so every query sees at least itself (no all-masked softmax)."""
    if bool((doc_ids == 0).all()):
        return None
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]


def batch_loss_sum(model, lm_head, batch, chunk):
    """Summed token cross-entropy of a collated batch (on the batch's device), via the fused chunked CE.
    lm_head: the head module, whose weight is read after the forward (under FSDP2 it is a DTensor shard until the
    root's forward has gathered it), or the weight itself."""
    hidden = model(batch["input_ids"], position_ids=batch["position_ids"],
                   attention_mask=packed_attention_mask(batch["doc_ids"]), return_hidden=True)
    weight = lm_head.weight if isinstance(lm_head, torch.nn.Module) else lm_head
    return chunked_cross_entropy(hidden, weight, batch["targets"], chunk_size=chunk, reduction="sum")


# ---- rm mode: pairs -> one right-padded batch, Bradley-Terry loss


def collate_pairs(rows, pad_id, pad_to=0):
    """Rows of one (chosen ids, rejected ids) pair each -> input_ids / attention_mask [2B, T], right-padded: the B
    chosen sequences first, then the B rejected ones, so one forward scores both sides (one DDP forward/backward)."""
    seqs = [row[0][0] for row in rows] + [row[0][1] for row in rows]
    T = max(pad_to, max(len(s) for s in seqs))
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, ids in enumerate(seqs):
        input_ids[b, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[b, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def pair_loss_sum(model, batch):
    """Bradley-Terry on a collate_pairs batch: -> (sum over pairs of -log sigmoid(r_chosen - r_rejected), the number
    of pairs ranked right, r_chosen > r_rejected). logsigmoid is stable for any margin; scores are read in fp32."""
    scores = model(batch["input_ids"], attention_mask=batch["attention_mask"]).float()
    chosen, rejected = scores.chunk(2)
    margin = chosen - rejected
    return -F.logsigmoid(margin).sum(), (margin.detach() > 0).sum()


def is_reward_model_dir(path):
    """True for a reward-model checkpoint (config.json's architectures are *ForSequenceClassification; without
    architectures, a score.weight tensor), False for a causal LM."""
    conf = os.path.join(path, "config.json")
    archs = (json.load(open(conf)).get("architectures") or []) if os.path.isfile(conf) else []
    if archs:
        return any(a.endswith("ForSequenceClassification") for a in archs)
    return any("score.weight" in keys for keys in _weight_files(path).values())


# -----------------------------------------------------------------------------


def main(argv=None):
    cfg = configure(sys.argv[1:] if argv is None else argv)
    rm = cfg.mode == "rm"

    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    ddp, rank, local_rank, world, device, dev_type = rt.ddp, rt.rank, rt.local_rank, rt.world, rt.device, rt.dev_type
    master, log, autocast, amp_dtype = rt.master, rt.log, rt.autocast(), rt.amp_dtype

    # ---- checkpoint to resume from?
    ckpt_path = os.path.join(cfg.out_dir, "ckpt")
    resume_from = find_checkpoint(ckpt_path) if cfg.resume else None
    if cfg.resume and resume_from is None:
        log(f"--resume=1 but no checkpoint in {ckpt_path}; starting fresh")

    # ---- tokenizer and data
    tok_dir = cfg.tokenizer or (resume_from or cfg.init_from)
    if tok_dir == "scratch":
        raise SystemExit("--init_from=scratch needs --tokenizer=DIR")
    tok = Tokenizer.from_pretrained(tok_dir)
    train_spec = parse_data_spec(cfg.data)
    sources, stats = load_examples([p for p, _ in train_spec], tok, cfg, log, rank, world)
    weights = None if train_spec[0][1] is None else [w for _, w in train_spec]
    eval_examples = []
    if cfg.eval_data:
        eval_sources, _ = load_examples([p for p, _ in parse_data_spec(cfg.eval_data)], tok, cfg, lambda *a: None,
                                        rank, world)
        eval_examples = [ex for src in eval_sources for ex in src]
    elif cfg.eval_frac > 0:
        held = []
        for i, src in enumerate(sources):  # hold out the same examples of every file in every run
            perm = np.random.default_rng([cfg.seed, 10_000 + i]).permutation(len(src))
            n_eval = min(int(len(src) * cfg.eval_frac), len(src) - 1)
            held += [src[j] for j in perm[:n_eval]]
            sources[i] = [src[j] for j in sorted(perm[n_eval:])]
        eval_examples = held
    eval_examples = eval_examples[:cfg.eval_max_examples]
    eval_rows = [[ex] for ex in eval_examples]
    if cfg.pack:
        eval_rows = [[eval_examples[i] for i in r] for r in pack_best_fit([len(e[0]) for e in eval_examples],
                                                                          cfg.max_seq_len)]

    rows_per_step = cfg.batch_size * cfg.grad_accum * world
    stream = RowStream(sources, weights, cfg.max_seq_len, cfg.seed, bool(cfg.pack))
    epoch0 = stream.rows_in_epoch(0)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(epoch0) / rows_per_step))
    if rm:
        n_tok = sum(len(ex[0]) + len(ex[1]) for row in epoch0 for ex in row)
        log(f"data: {stats['rows']} rows from {len(sources)} file(s) -> {sum(map(len, sources))} train / "
            f"{len(eval_examples)} eval pairs; epoch = {len(epoch0)} pairs, {n_tok} tokens (both sides); "
            f"dropped {stats['dropped']} (a side over max_seq_len={cfg.max_seq_len}), skipped {stats['skipped']}")
    else:
        n_tok = sum(len(ex[0]) for row in epoch0 for ex in row)
        n_learn = sum(int(ex[1][1:].sum()) for row in epoch0 for ex in row)
        log(f"data: {stats['rows']} rows from {len(sources)} file(s) -> {sum(map(len, sources))} train / "
            f"{len(eval_examples)} eval examples; epoch = {len(epoch0)} rows of <= {cfg.max_seq_len}, "
            f"{n_tok} tokens ({n_learn} learned, fill {n_tok / (len(epoch0) * cfg.max_seq_len):.0%}); "
            f"truncated {stats['truncated']}, dropped {stats['dropped']}, skipped {stats['skipped']}")

    # ---- model
    if rm and cfg.init_from != "scratch" and not resume_from:
        # fp32 master weights (see below); from a causal LM (the usual case: the SFT checkpoint) with a fresh head
        if is_reward_model_dir(cfg.init_from):
            model = RewardModel.from_pretrained(cfg.init_from, dtype=torch.float32, device=device)
        else:
            model = RewardModel.from_causal_lm(cfg.init_from, dtype=torch.float32, device=device,
                                               pad_token_id=tok.pad_id)
    elif resume_from:
        model = (RewardModel if rm else Transformer).from_pretrained(resume_from, dtype=torch.float32, device=device)
    elif cfg.init_from == "scratch":
        mc = cfg.model_config
        over = json.load(open(mc)) if mc and os.path.isfile(mc) else json.loads(mc or "{}")
        if "model_type" in over and "hidden_size" in over and "architectures" in over:
            mconf = ModelConfig.from_hf(over)  # a full HF config.json
        else:
            over.setdefault("vocab_size", -(-tok.vocab_size // 64) * 64)  # round up: faster matmuls
            mconf = ModelConfig(**over)
        mconf.dtype = "float32"
        with torch.device(device):
            model = (RewardModel(mconf, pad_token_id=tok.pad_id) if rm else Transformer(mconf)).init_weights()
    else:
        # fp32 master weights: bf16 compute comes from autocast, so tiny updates are not rounded away
        model = Transformer.from_pretrained(cfg.init_from, dtype=torch.float32, device=device)
    if model.config.vocab_size < tok.vocab_size:
        raise SystemExit(f"model vocab {model.config.vocab_size} < tokenizer vocab {tok.vocab_size}")
    model.gradient_checkpointing = bool(cfg.grad_checkpointing)
    raw_model = model
    log(f"model: {model.num_params() / 1e6:.2f}M params, {model.config.num_hidden_layers} layers, "
        f"hidden {model.config.hidden_size}, vocab {model.config.vocab_size}; device {device}, world {world}, "
        f"{'bf16 autocast' if amp_dtype else 'fp32'}{', FSDP2-sharded' if cfg.fsdp else ''}")
    if cfg.fsdp:
        shard_model(model)  # in place, before the optimizer: it must hold the DTensor shards
    optimizer = make_optimizer(raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), fused=dev_type == "cuda")

    step = 0
    if resume_from:
        state = load_trainer_state(resume_from, mmap=bool(cfg.fsdp))
        load_optimizer_state(raw_model, optimizer, state["optimizer"], cfg.fsdp, state.get("fsdp", False))
        step = state["step"]
        stream.epoch, stream.pos = state["data"]["epoch"], state["data"]["pos"]
        total_steps = state["total_steps"] if not cfg.max_steps else total_steps
        rngs = state["rng"]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        log(f"resumed from {resume_from} at step {step} (epoch {stream.epoch}, row {stream.pos})")

    if cfg.compile:
        model = torch.compile(model)
    if ddp and not cfg.fsdp:  # (FSDP2 reduces the gradients itself)
        model = DDP(model, device_ids=[local_rank] if dev_type == "cuda" else None)

    metrics = MetricsFile(cfg.out_dir, master, step if resume_from else None)
    all_sum = rt.all_sum

    # per mode: a batch, what its loss is a mean over (learned tokens | pairs), and its summed loss
    def make_batch(rows, pad_to=0):
        return collate_pairs(rows, tok.pad_id, pad_to) if rm else collate(rows, tok.pad_id, pad_to)

    def n_terms(b):
        return b["input_ids"].shape[0] // 2 if rm else int((b["targets"] != -100).sum())

    def n_tokens(b):
        return int(b["attention_mask"].sum()) if rm else int((b["doc_ids"] >= 0).sum())

    def loss_sum_of(m, b):
        """-> (summed loss, pairs ranked right: rm only, else 0)"""
        return pair_loss_sum(m, b) if rm else (batch_loss_sum(m, raw_model.lm_head, b, cfg.ce_chunk), 0)

    @torch.no_grad()
    def evaluate():
        model.eval()
        loss_sum, count, right = 0.0, 0, 0
        mine = eval_rows[rank::world]
        # FSDP: every rank runs as many forwards as rank 0, which has the most rows (each forward all-gathers the
        # blocks together with the other ranks); a rank out of rows runs a padding batch and drops its loss
        n_batches = -(-len(eval_rows[::world] if cfg.fsdp else mine) // cfg.batch_size)
        for i in range(0, n_batches * cfg.batch_size, cfg.batch_size):
            part = mine[i:i + cfg.batch_size]
            batch = {k: v.to(device) for k, v in make_batch(part or eval_rows[:1]).items()}
            with autocast:
                loss, n_right = loss_sum_of(raw_model, batch)
            if part:
                loss_sum += loss.item()
                count += n_terms(batch)
                right += int(n_right)
        if cfg.fsdp:  # FSDP2 keeps the root's parameters gathered after a forward, for the backward that follows a
            raw_model.reshard()  # training one: after a no-grad pass free them (.parameters() are shards again)
        model.train()
        loss_sum, count, right = all_sum([loss_sum, count, right])
        return loss_sum / max(1.0, count), right / max(1.0, count)  # (mean loss, pairwise accuracy: rm)

    def checkpoint():
        rngs = all_rng_states(rt)
        weights = full_state_dict(raw_model) if cfg.fsdp else None  # collectives: on every rank
        opt_state = optimizer_state(raw_model, optimizer, cfg.fsdp)
        if master:
            save_checkpoint(ckpt_path, raw_model, tok_dir, {
                "optimizer": opt_state, "step": step, "total_steps": total_steps, "fsdp": bool(cfg.fsdp),
                "data": stream.state(), "rng": rngs, "config": dict(cfg), "world_size": world}, state_dict=weights)
        if ddp:
            dist.barrier()

    if rm:  # 6N without the embedding (a lookup, and there is no lm_head matmul) + attention, as flops_per_token
        c = raw_model.config
        flops_per_tok = 6 * (raw_model.num_params() - c.vocab_size * c.hidden_size) + \
            6 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * cfg.max_seq_len
    else:
        flops_per_tok = raw_model.flops_per_token(cfg.max_seq_len)
    peak = peak_flops(torch.cuda.get_device_name(device)) * world if dev_type == "cuda" else None
    bar = None
    if master and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=step, dynamic_ncols=True, desc=cfg.mode)
    eval_loss = train_loss = eval_acc = None
    post = {}  # progress-bar fields
    model.train()
    train_time, tok_since = 0.0, 0  # since the last log line; eval and checkpoint time excluded
    while step < total_steps:
        t0 = time.time()
        # ---- one optimizer step over batch_size x grad_accum rows on each rank
        lr_now = lr_at(step, total_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr_now
        rows = stream.take(rows_per_step)  # every rank advances the same stream ...
        mine = rows[rank * cfg.batch_size * cfg.grad_accum:(rank + 1) * cfg.batch_size * cfg.grad_accum]
        micro = [make_batch(mine[a * cfg.batch_size:(a + 1) * cfg.batch_size],  # ... collates its share
                            pad_to=cfg.max_seq_len if cfg.compile else 0)  # static shapes: no recompiles
                 for a in range(cfg.grad_accum)]
        n_targets = all_sum(sum(n_terms(m) for m in micro))  # target tokens, or pairs (rm)
        loss_sum, n_right = torch.zeros((), device=device), 0
        for a, mb in enumerate(micro):
            mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
            # sync gradients across ranks only on the last micro-batch
            last_micro = a == cfg.grad_accum - 1
            if cfg.fsdp:  # FSDP2's no_sync: accumulate unsharded gradients, reduce-scatter them on the last one
                raw_model.set_requires_gradient_sync(last_micro)
            sync = nullcontext() if (not ddp or cfg.fsdp or last_micro) else model.no_sync()
            with sync:
                with autocast:
                    loss, right = loss_sum_of(model, mb)
                # DDP and FSDP2 both average gradients over ranks (FSDP2's default reduce-scatter op is AVG);
                # x world turns that into a sum, / n_targets into the mean over every target token (pair) of the step
                (loss * (world / max(1.0, n_targets))).backward()
            loss_sum += loss.detach()
            n_right += right
        # (on DTensor shards too: the norm is reduced over ranks, so it is the norm of the whole gradient)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0
                                                   else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_loss, step_right, step_tok = all_sum([loss_sum.item(), float(n_right), sum(n_tokens(m) for m in micro)])
        train_loss = step_loss / max(1.0, n_targets)
        tok_since += step_tok
        if dev_type == "cuda":
            torch.cuda.synchronize()
        train_time += time.time() - t0

        # ---- log / eval / save
        last = step == total_steps
        evaluated = bool(eval_rows) and ((cfg.eval_every and step % cfg.eval_every == 0) or last)
        if evaluated:
            eval_loss, eval_acc = evaluate()
        if step % cfg.log_every == 0 or last:
            tps = tok_since / max(train_time, 1e-9)
            rec = {"step": step, "loss": round(train_loss, 5), "lr": lr_now, "grad_norm": round(float(grad_norm), 4),
                   "tokens_per_s": round(tps, 1), "epoch": stream.epoch}
            if rm:
                rec.update(pair_acc=round(step_right / max(1.0, n_targets), 5), pairs=int(n_targets))
            else:
                rec["target_tokens"] = int(n_targets)
            if evaluated:
                rec["eval_loss"] = round(eval_loss, 5)
                if rm:
                    rec["eval_pair_acc"] = round(eval_acc, 5)
            if peak:
                rec["mfu"] = round(flops_per_tok * tps / peak, 4)
            metrics.write(rec)
            post["tok/s"] = f"{tps:.0f}"
            if "eval_loss" in rec:
                post["eval"] = f"{eval_loss:.4f}"
                if rm:
                    post["eval_acc"] = f"{eval_acc:.1%}"
            if peak:
                post["mfu"] = f"{100 * rec['mfu']:.1f}%"
            if bar is None and master:
                print(json.dumps(rec))
            if peak and master:
                line = f"step {step}: loss {train_loss:.4f} | {tps:.0f} tok/s | MFU {100 * rec['mfu']:.1f}%"
                bar.write(line) if bar is not None else print(line)
            train_time, tok_since = 0.0, 0
        if bar is not None:
            post.update(loss=f"{train_loss:.4f}", lr=f"{lr_now:.2e}")
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        if save_or_stop(step, last, cfg.save_every, cfg.stop_after, checkpoint, log):
            break
    if bar is not None:
        bar.close()
    if master and step == total_steps and train_loss is not None:
        log(f"done: {step} steps, train loss {train_loss:.4f}"
            f"{f', eval loss {eval_loss:.4f}' if eval_loss is not None else ''}"
            f"{f', eval pairwise accuracy {eval_acc:.1%}' if rm and eval_acc is not None else ''}"
            f"; checkpoint in {ckpt_path}")
    teardown(rt)
    res = {"step": step, "total_steps": total_steps, "train_loss": train_loss, "eval_loss": eval_loss, "stats": stats}
    if rm:
        res["eval_pair_acc"] = eval_acc
    return res


if __name__ == "__main__":
    main()
    exit_if_torchrun()
