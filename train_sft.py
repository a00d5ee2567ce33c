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
    # the same on 8 GPUs (each rank collates only its own packs; rank 0 logs and saves)
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
content + the turn-closing token are learned. Conversations may call tools (assistant "tool_calls", "tool" turns,
their schemas in an optional "tools" field, as in tokenizer.apply_chat_template): the calls are learned, the tool
results and the template's glue are not. `--data=a.jsonl:0.7,b.jsonl:0.3` mixes files by weight, and epoch
e's order is a function of (seed, e), so --resume is exact (dataloader.py says how).

Loss normalisation: every optimizer step divides the summed token loss by the number of target tokens
in the whole step (all micro-batches of all ranks; the count is all-reduced first). So the gradient is
the same whatever the split into ranks x grad_accum x batch_size, and a pack weighs its tokens
exactly like the unpacked examples would. rm: the pair losses are summed and divided by the step's pair count.

--fsdp=1 (under torchrun) replaces the DDP wrapper with FSDP2 (train_common.shard_model): the same gradient, the same
step, ordinary HF-layout checkpoints (gathered onto rank 0), and a resumable optimizer state (gathered whole too).
"""
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import parse_overrides
from dataloader import (PackStream, collate, collate_pairs, load_examples, pack_best_fit, packed_attention_mask,
                        parse_data_spec)
from lora import tokenizer_dir
from losses import bradley_terry_loss, chunked_cross_entropy
from model import ModelConfig, RewardModel, Transformer, at_least_fp32, is_adapter_dir, is_reward_model_dir
from tokenizer import Tokenizer
from train_common import (Config, RunLog, exit_if_torchrun, find_checkpoint, import_wandb, lora_from_flags, lr_at,
                          make_optimizer, peak_flops, restore_checkpoint, save_checkpoint, save_or_stop, setup_runtime,
                          shard_model, start_wandb, teardown)

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
pack = 1  # best-fit packing of several examples per sequence (0: one example each, padded); rm: always 0
batch_size = 8  # packs per micro-batch per rank
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
dtype = "auto"  # auto: bf16 autocast (fp32 master weights) on cuda, fp32 on cpu | float32 | bfloat16 | float64
device = "auto"  # auto | cpu | cuda
compile = 0  # torch.compile the model
# LoRA (lora.py): adapters on a frozen base instead of every weight
lora_rank = 0  # >0: train LoRA adapters of this rank (init_from may also be an adapter dir: trained further)
lora_alpha = 32  # the adapters' scale is lora_alpha / lora_rank
lora_targets = "all-linear"  # q,k,v,o,gate,up,down projections of every block, or a comma list of those names
lora_base = ""  # the base of an adapter given as init_from, where its adapter_config.json names none that exists here
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
wandb_project = ""  # W&B project: every metrics.jsonl line also goes there, from global rank 0 ("": off)
wandb_run = ""  # the W&B run's name ("": W&B picks one)
CONFIG_KEYS = [k for k in globals() if k not in _globals_before_config and not k.startswith("_")]
# -----------------------------------------------------------------------------


def configure(argv=(), overrides=None):
    """Module defaults overridden by --key=value arguments (and, from code, an overrides dict), typed like the
    default (bools as 0/1)."""
    cfg = Config(parse_overrides(argv, {k: globals()[k] for k in CONFIG_KEYS}, overrides))
    if cfg.mode not in ("sft", "pretrain", "rm"):
        raise SystemExit(f"--mode={cfg.mode}: expected sft, pretrain or rm")
    if cfg.mode == "rm":
        cfg["pack"] = 0  # a pair is scored at each side's last token: one sequence per pack
    return cfg


# -----------------------------------------------------------------------------
# the objective of each mode: how packs become a batch, what a step's loss is a mean over, and the summed loss


def batch_loss_sum(model, lm_head, batch, chunk):
    """Summed token cross-entropy of a collated batch (on the batch's device), via the fused chunked CE.
    lm_head: the head module, whose weight is read after the forward (under FSDP2 it is a DTensor shard until the
    root's forward has gathered it), or the weight itself."""
    hidden = model(batch["input_ids"], position_ids=batch["position_ids"],
                   attention_mask=packed_attention_mask(batch["doc_ids"]), return_hidden=True)
    weight = lm_head.weight if isinstance(lm_head, torch.nn.Module) else lm_head
    return chunked_cross_entropy(hidden, weight, batch["targets"], chunk_size=chunk, reduction="sum")


def pair_loss_sum(model, batch):
    """Bradley-Terry on a collate_pairs batch (losses.bradley_terry_loss; scores read in at least fp32): -> (summed
    loss, the number of pairs ranked right)."""
    scores = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    chosen, rejected = scores.to(at_least_fp32(scores.dtype)).chunk(2)
    return bradley_terry_loss(chosen, rejected)


class TokenObjective:
    """sft and pretrain: cross-entropy on the learned tokens of packed sequences; a step's mean is over them."""

    def __init__(self, model, pad_id, ce_chunk):
        self.model, self.pad_id, self.ce_chunk = model, pad_id, ce_chunk

    def batch(self, packs, pad_to=0):
        return collate(packs, self.pad_id, pad_to)

    def terms(self, batch):  # what the loss is a mean over
        return int((batch["targets"] != -100).sum())

    def tokens(self, batch):  # what the forward reads, for tokens/s
        return int((batch["doc_ids"] >= 0).sum())

    def loss_sum(self, train_model, batch):  # -> (summed loss, 0)
        return batch_loss_sum(train_model, self.model.lm_head, batch, self.ce_chunk), 0

    def flops_per_token(self, seq_len):
        return self.model.flops_per_token(seq_len)


class PairObjective(TokenObjective):
    """rm: Bradley-Terry on (chosen, rejected) pairs scored by a RewardModel; a step's mean is over pairs."""

    def batch(self, packs, pad_to=0):
        return collate_pairs(packs, self.pad_id, pad_to)

    def terms(self, batch):
        return batch["input_ids"].shape[0] // 2

    def tokens(self, batch):
        return int(batch["attention_mask"].sum())

    def loss_sum(self, train_model, batch):  # -> (summed loss, pairs ranked right)
        return pair_loss_sum(train_model, batch)

    def flops_per_token(self, seq_len):  # 6N without the embedding (a lookup; there is no lm_head matmul) + attention
        c = self.model.config
        return 6 * (self.model.num_params() - c.vocab_size * c.hidden_size) + \
            6 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len


# -----------------------------------------------------------------------------
# data and model


def load_data(cfg, tok, rt):
    """-> (the training PackStream, the held-out packs, tokenising stats): --eval_data, or eval_frac of every file held
    out (the same examples in every run)."""
    spec = parse_data_spec(cfg.data)
    load = dict(mode=cfg.mode, max_seq_len=cfg.max_seq_len, skip_bad_rows=cfg.skip_bad_rows, rank=rt.rank,
                world=rt.world)
    sources, stats = load_examples([p for p, _ in spec], tok, log=rt.log, **load)
    held = []
    if cfg.eval_data:
        files = [p for p, _ in parse_data_spec(cfg.eval_data)]
        held = [ex for src in load_examples(files, tok, log=lambda *a: None, **load)[0] for ex in src]
    elif cfg.eval_frac > 0:
        for i, src in enumerate(sources):
            perm = np.random.default_rng([cfg.seed, 10_000 + i]).permutation(len(src))
            n_eval = min(int(len(src) * cfg.eval_frac), len(src) - 1)
            held += [src[j] for j in perm[:n_eval]]
            sources[i] = [src[j] for j in sorted(perm[n_eval:])]
    held = held[:cfg.eval_max_examples]
    eval_packs = [[held[i] for i in p] for p in pack_best_fit([len(e[0]) for e in held], cfg.max_seq_len)] \
        if cfg.pack else [[ex] for ex in held]
    stream = PackStream(sources, None if spec[0][1] is None else [w for _, w in spec], cfg.max_seq_len, cfg.seed,
                        bool(cfg.pack))
    epoch0 = stream.packs_in_epoch(0)
    n_tok = sum(len(ex[0]) + (len(ex[1]) if cfg.mode == "rm" else 0) for pack in epoch0 for ex in pack)
    what = (f"{len(epoch0)} pairs, {n_tok} tokens (both sides); dropped {stats['dropped']} (a side over max_seq_len="
            f"{cfg.max_seq_len})" if cfg.mode == "rm" else
            f"{len(epoch0)} packs of <= {cfg.max_seq_len}, {n_tok} tokens "
            f"({sum(int(ex[1][1:].sum()) for pack in epoch0 for ex in pack)} learned, fill "
            f"{n_tok / (len(epoch0) * cfg.max_seq_len):.0%}); truncated {stats['truncated']}, "
            f"dropped {stats['dropped']}")
    rt.log(f"data: {stats['rows']} rows from {len(sources)} file(s) -> {sum(map(len, sources))} train / {len(held)} "
           f"eval examples; epoch = {what}, skipped {stats['skipped']}")
    return stream, eval_packs, stats


def build_model(cfg, tok, rt, resume_from):
    """The model to train, in fp32 master weights (bf16 compute comes from autocast, so tiny updates are not rounded
    away; fp64 under --dtype=float64): resumed, from init_from (rm: a RewardModel, from a causal LM with a fresh score
    head), or from scratch."""
    device, dtype = rt.device, rt.param_dtype
    if cfg.lora_rank or (cfg.init_from != "scratch" and is_adapter_dir(resume_from or cfg.init_from)):
        if cfg.mode == "rm" or cfg.init_from == "scratch":
            raise SystemExit("LoRA trains a causal LM from a checkpoint (not --mode=rm or --init_from=scratch)")
        return lora_from_flags(resume_from or cfg.init_from, cfg, rt)
    cls = RewardModel if cfg.mode == "rm" else Transformer
    if resume_from or (cfg.init_from != "scratch" and (cls is Transformer or is_reward_model_dir(cfg.init_from))):
        return cls.from_pretrained(resume_from or cfg.init_from, dtype=dtype, device=device)
    if cfg.init_from != "scratch":
        return RewardModel.from_causal_lm(cfg.init_from, dtype=dtype, device=device, pad_token_id=tok.pad_id)
    mc = cfg.model_config
    over = json.load(open(mc)) if mc and os.path.isfile(mc) else json.loads(mc or "{}")
    if "model_type" in over and "hidden_size" in over and "architectures" in over:
        mconf = ModelConfig.from_hf(over)  # a full HF config.json
    else:
        over.setdefault("vocab_size", -(-tok.vocab_size // 64) * 64)  # round up: faster matmuls
        mconf = ModelConfig(**over)
    mconf.dtype = str(dtype).removeprefix("torch.")
    with torch.device(device):
        model = RewardModel(mconf, pad_token_id=tok.pad_id) if cls is RewardModel else Transformer(mconf)
    return model.init_weights().to(dtype)


@torch.no_grad()
def evaluate(train_model, model, objective, eval_packs, cfg, rt):
    """-> (mean held-out loss, pairwise accuracy: rm only). Rank r takes packs r, r+world, ...; under FSDP every rank
    runs as many forwards as rank 0, which has the most (each forward all-gathers the blocks together with the other
    ranks): a rank out of packs runs a padding batch and drops its loss."""
    train_model.eval()
    loss_sum, count, right = 0.0, 0, 0
    mine = eval_packs[rt.rank::rt.world]
    n_batches = -(-len(eval_packs[::rt.world] if cfg.fsdp else mine) // cfg.batch_size)
    for i in range(0, n_batches * cfg.batch_size, cfg.batch_size):
        part = mine[i:i + cfg.batch_size]
        batch = {k: v.to(rt.device) for k, v in objective.batch(part or eval_packs[:1]).items()}
        with rt.autocast():
            loss, n_right = objective.loss_sum(model, batch)
        if part:
            loss_sum, count, right = loss_sum + loss.item(), count + objective.terms(batch), right + int(n_right)
    if cfg.fsdp:  # FSDP2 keeps the root's parameters gathered after a forward, for the backward that follows a
        model.reshard()  # training one: after a no-grad pass free them (.parameters() are shards again)
    train_model.train()
    loss_sum, count, right = rt.all_sum([loss_sum, count, right])
    return loss_sum / max(1.0, count), right / max(1.0, count)


# -----------------------------------------------------------------------------


def main(argv=(), **overrides):
    """Train; argv: --key=value strings (and recipe files), overrides: the same as keywords (distill.py calls it so)."""
    cfg = configure(argv, overrides)
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    if cfg.wandb_project and rt.master:
        import_wandb()
    ckpt_path, resume_from = find_checkpoint(cfg.out_dir, cfg.resume, rt.log)
    tok_dir = cfg.tokenizer or tokenizer_dir(resume_from or cfg.init_from, cfg.lora_base)
    if tok_dir == "scratch":
        raise SystemExit("--init_from=scratch needs --tokenizer=DIR")
    tok = Tokenizer.from_pretrained(tok_dir)
    stream, eval_packs, stats = load_data(cfg, tok, rt)
    packs_per_step, per_rank = cfg.batch_size * cfg.grad_accum * rt.world, cfg.batch_size * cfg.grad_accum
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(stream.packs_in_epoch(0)) / packs_per_step))

    model = build_model(cfg, tok, rt, resume_from)
    if model.config.vocab_size < tok.vocab_size:
        raise SystemExit(f"model vocab {model.config.vocab_size} < tokenizer vocab {tok.vocab_size}")
    model.gradient_checkpointing = bool(cfg.grad_checkpointing)
    objective = (PairObjective if cfg.mode == "rm" else TokenObjective)(model, tok.pad_id, cfg.ce_chunk)
    rt.log(f"model: {model.num_params() / 1e6:.2f}M params, {model.config.num_hidden_layers} layers, hidden "
           f"{model.config.hidden_size}, vocab {model.config.vocab_size}; device {rt.device}, world {rt.world}, "
           f"{rt.compute}{', FSDP2-sharded' if cfg.fsdp else ''}")
    if cfg.fsdp:
        shard_model(model)  # in place, before the optimizer: it must hold the DTensor shards
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), fused=rt.dev_type == "cuda")
    step = 0
    if resume_from:
        state = restore_checkpoint(rt, resume_from, model, optimizer, cfg.fsdp)
        step, total_steps = state["step"], total_steps if cfg.max_steps else state["total_steps"]
        stream.epoch, stream.pos = state["data"]["epoch"], state["data"]["pos"]
        rt.log(f"resumed from {resume_from} at step {step} (epoch {stream.epoch}, pack {stream.pos})")
    train_model = torch.compile(model) if cfg.compile else model
    if rt.ddp and not cfg.fsdp:  # (FSDP2 reduces the gradients itself)
        train_model = DDP(train_model, device_ids=[rt.local_rank] if rt.dev_type == "cuda" else None)
    wandb_run = start_wandb(cfg.wandb_project, cfg.wandb_run, cfg, rt)
    log = StepLog(cfg, rt, objective, total_steps, step, resume_from, wandb_run)
    eval_loss = train_loss = eval_acc = None
    train_model.train()
    while step < total_steps:
        t0 = time.time()
        # ---- one optimizer step over batch_size x grad_accum packs on each rank
        lr = lr_at(step, total_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        mine = stream.take(packs_per_step)[rt.rank * per_rank:(rt.rank + 1) * per_rank]  # every rank advances the
        micro = [objective.batch(mine[a * cfg.batch_size:(a + 1) * cfg.batch_size],  # stream, collates its share
                                 pad_to=cfg.max_seq_len if cfg.compile else 0)  # static shapes: no recompiles
                 for a in range(cfg.grad_accum)]
        n_terms = rt.all_sum(sum(objective.terms(m) for m in micro))  # learned tokens, or pairs (rm)
        loss_sum, n_right = torch.zeros((), device=rt.device), 0
        for a, mb in enumerate(micro):
            mb = {k: v.to(rt.device, non_blocking=True) for k, v in mb.items()}
            last_micro = a == cfg.grad_accum - 1  # sync gradients across ranks only on the last micro-batch
            if cfg.fsdp:  # FSDP2's no_sync: accumulate unsharded gradients, reduce-scatter them on the last one
                model.set_requires_gradient_sync(last_micro)
            with nullcontext() if (not rt.ddp or cfg.fsdp or last_micro) else train_model.no_sync():
                with rt.autocast():
                    loss, right = objective.loss_sum(train_model, mb)
                # DDP and FSDP2 both average gradients over ranks (FSDP2's default reduce-scatter op is AVG): x world
                # makes that a sum, / n_terms the mean over every learned token (pair) of the step
                (loss * (rt.world / max(1.0, n_terms))).backward()
            loss_sum, n_right = loss_sum + loss.detach(), n_right + right
        # (on DTensor shards too: the norm is reduced over ranks, so it is the norm of the whole gradient)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_loss, step_right, step_tok = rt.all_sum([loss_sum.item(), float(n_right),
                                                      sum(objective.tokens(m) for m in micro)])
        train_loss = step_loss / max(1.0, n_terms)
        if rt.dev_type == "cuda":
            torch.cuda.synchronize()
        step_time = time.time() - t0

        # ---- log / eval / save
        last = step == total_steps
        rec = dict(loss=round(train_loss, 5), lr=lr, grad_norm=round(float(grad_norm), 4), epoch=stream.epoch,
                   **(dict(pair_acc=round(step_right / max(1.0, n_terms), 5), pairs=int(n_terms)) if cfg.mode == "rm"
                      else dict(target_tokens=int(n_terms))))
        if eval_packs and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
            eval_loss, eval_acc = evaluate(train_model, model, objective, eval_packs, cfg, rt)
            rec["eval_loss"] = round(eval_loss, 5)
            if cfg.mode == "rm":
                rec["eval_pair_acc"] = round(eval_acc, 5)
        log.step(step, last, step_time, step_tok, rec)
        if save_or_stop(step, last, cfg.save_every, cfg.stop_after, lambda: save_checkpoint(
                rt, ckpt_path, model, optimizer, tok_dir, cfg.fsdp, step=step, total_steps=total_steps,
                data=stream.state(), config=dict(cfg)), rt.log):
            break
    log.close()
    if step == total_steps and train_loss is not None:
        rt.log(f"done: {step} steps, train loss {train_loss:.4f}"
               f"{f', eval loss {eval_loss:.4f}' if eval_loss is not None else ''}"
               f"{f', eval pairwise accuracy {eval_acc:.1%}' if cfg.mode == 'rm' and eval_acc is not None else ''}"
               f"; checkpoint in {ckpt_path}")
    teardown(rt)
    res = dict(step=step, total_steps=total_steps, train_loss=train_loss, eval_loss=eval_loss, stats=stats)
    return {**res, "eval_pair_acc": eval_acc} if cfg.mode == "rm" else res


class StepLog(RunLog):
    """Every log_every steps (and at the last): a metrics line, with tokens/s over the training time since the last
    one (eval and checkpoint time left out) and on GPU MFU (also printed); the bar every step."""

    def __init__(self, cfg, rt, objective, total_steps, step, resume_from, wandb_run):
        super().__init__(cfg.out_dir, rt, total_steps, step, step if resume_from else None, cfg.mode, cfg.progress,
                         wandb_run)
        self.every, self.flops_per_token = cfg.log_every, objective.flops_per_token(cfg.max_seq_len)
        self.peak = peak_flops(torch.cuda.get_device_name(rt.device)) * rt.world if rt.dev_type == "cuda" else None
        self.post, self.time, self.tokens = {}, 0.0, 0

    def step(self, step, last, seconds, tokens, rec):
        self.time, self.tokens = self.time + seconds, self.tokens + tokens
        if step % self.every == 0 or last:
            tps = self.tokens / max(self.time, 1e-9)
            rec = {"step": step, **rec, "tokens_per_s": round(tps, 1)}
            if self.peak:
                rec["mfu"] = round(self.flops_per_token * tps / self.peak, 4)
                self.post["mfu"] = f"{100 * rec['mfu']:.1f}%"
                self.say(f"step {step}: loss {rec['loss']:.4f} | {tps:.0f} tok/s | MFU {100 * rec['mfu']:.1f}%")
            self.write(rec)
            self.post["tok/s"] = f"{tps:.0f}"
            if "eval_loss" in rec:
                self.post["eval"] = f"{rec['eval_loss']:.4f}"
            if "eval_pair_acc" in rec:
                self.post["eval_acc"] = f"{rec['eval_pair_acc']:.1%}"
            self.time, self.tokens = 0.0, 0
        self.tick({**self.post, "loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr']:.2e}"})


if __name__ == "__main__":
    main(sys.argv[1:])
    exit_if_torchrun()
