"""
GRPO for nanoR1: R1-Zero (RL straight from a base model) and R1's reasoning RL (after a cold start).

Launch:
    # the embedded default: reasoning RL of the shipped tiny cold-start model on the tiny task, CPU, minutes
    python train_grpo.py
    # R1-Zero on a real base model, 8 GPUs (recipes in config/; --key=value overrides after them)
    torchrun --standalone --nproc_per_node=8 train_grpo.py config/r1zero_qwen2.5_1.5b_gsm8k.py
    # variants are flags: DAPO, Dr. GRPO, GSPO
    python train_grpo.py --clip_eps_high=0.28 --loss_agg=token --dynamic_sampling=1 --overlong=soft   # DAPO
    python train_grpo.py --loss_agg=constant --scale_rewards=none                                    # Dr. GRPO
    python train_grpo.py --importance_sampling=sequence --clip_eps_low=3e-4 --clip_eps_high=4e-4     # GSPO
    # continue a run exactly where its last checkpoint left off
    python train_grpo.py --out_dir=out/grpo --resume=1
    # R1's last stage, RL for all scenarios: rows with an answer (or tests, numbers/target) get the rule rewards,
    # rows without one a frozen reward model's score (x weight); files mix by weight
    python train_grpo.py --data=data/tiny/train.jsonl:0.6,general.jsonl:0.4 --reward_model=out/rm/ckpt \
        --reward_model_weight=1.0

One step: draw prompts_per_step prompts, sample group_size completions each with sample.Engine (prefill once,
fan out), score them with reward.py (with --reward_model, rows that carry nothing for a rule reward to check are
scored by a RewardModel instead), turn rewards into group-relative advantages, then ppo_epochs passes of
`minibatches` optimizer steps each over the rollout batch, with the clipped surrogate below.

DDP (torchrun): every rank holds the whole policy and samples its share of the step's prompts (prompt k of the step
goes to rank k % world) and scores its own groups (the reward model's too); the scored rollouts are all-gathered
(token ids, a few KB), so every rank sees the same global batch, advantages and minibatch split, and trains on its
share of each minibatch; gradients are summed with one all-reduce per optimizer step and every loss is divided by
the *global* normaliser. Each row's sampling seed comes from (seed, step, the prompt's global draw index, sample
index), never from the rank, so `torchrun --nproc_per_node=N` reaches the same parameters as one process with the
same prompts_per_step (up to float summation order: tests/test_grpo.py checks max |dparam| <= 1e-5 after a few fp32
steps; Adam can blow the rounding of a gradient that is ~0 up to an lr-sized step, which Qwen2's k_proj biases on
the slowest RoPE frequencies show, so the test uses a bias-free Qwen3-style model). The gradient is all-reduced by
hand rather than through the DistributedDataParallel wrapper because ranks run different numbers of forward/backward
passes (rows with zero advantage are skipped), which the wrapper cannot sync.

FSDP2 (--fsdp=1, for policies whose AdamW state does not fit one GPU): the policy is sharded for the update
(train_common.shard_model) and FSDP2 reduce-scatters the gradients, so the hand all-reduce is skipped. Its forwards
and backwards are collectives, so there every rank runs the same number of micro-batches: a rank with fewer rows in a
minibatch runs padding passes on a row of it with zero weight (the zero-advantage skip stays: that is where the
counts come apart). Rollouts sample from a separate unsharded copy of the policy (also in fp32 on the CPU), refreshed
after each update by all-gathering the shards into it: the Engine (KV cache, CUDA graphs, prepacked CPU weights)
needs plain tensors at fixed addresses, which an FSDP module only has transiently. A reference model (beta > 0) is
used for inference only and stays unsharded. Checkpoints are gathered onto rank 0: the same HF-layout files.
"""
import copy
import json
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from configurator import parse_overrides
from model import RewardModel, Transformer, chunked_token_logprobs
from reward import accuracy_reward, combine_rewards
from sample import PROMPT_TEMPLATES, Engine, encode_problem, pass_at_1, prompt_messages, score_problems
from tokenizer import Tokenizer
from train_common import (Config, MetricsFile, all_rng_states, copy_full_params, exit_if_torchrun, find_checkpoint,
                          full_state_dict, load_optimizer_state, load_trainer_state, lr_at, make_optimizer,
                          optimizer_state, parse_data_spec, peak_flops, read_rows, save_checkpoint, save_or_stop,
                          set_rng_state, setup_runtime, shard_model, teardown)
from train_sft import RowStream, reward_model_input

# -----------------------------------------------------------------------------
# config (defaults = reasoning RL of the embedded tiny model on CPU)
_globals_before_config = set(globals())
init_from = "data/tiny/rl_start"  # HF-layout checkpoint dir (policy start and, with beta > 0, the reference)
data = "data/tiny/train.jsonl"  # RL prompts: comma-separated files, each optionally path:weight
eval_data = "data/tiny/test.jsonl"  # held-out problems for greedy pass@1
eval_n = 500  # first eval_n problems of eval_data
eval_rm_data = ""  # with --reward_model: held-out prompts whose greedy completions the RM scores at every eval
eval_rm_n = 200  # first eval_rm_n prompts of eval_rm_data
eval_every = 40  # steps between evaluations (plus one before the first step and one at the end); 0: none at all
prompt_template = "chat"  # chat: the tokenizer's chat template | r1zero: R1-Zero's plain-text template (base models)
rewards = "accuracy:1"  # reward.py names with weights; every component is logged on its own
reward_model = ""  # RewardModel dir (R1 stage 4): scores the rows without answer / tests / numbers+target
reward_model_weight = 1.0  # such a row's reward = weight x RM score (logged unweighted as reward/rm)
group_size = 16  # G: completions per prompt
prompts_per_step = 16  # prompts per step over all ranks (x group_size rows)
max_steps = 120
ppo_epochs = 1  # mu: passes over each rollout batch
minibatches = 1  # optimizer steps per pass
micro_batch_size = 64  # rows per forward/backward on each rank (memory only: the gradient does not change)
lr = 5e-5
min_lr = 1e-5
warmup_steps = 10
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0  # 0 disables
clip_eps_low = 0.2  # PPO/GRPO clip range [1 - low, 1 + high]; DAPO's clip-higher raises high to 0.28
clip_eps_high = 0.2
loss_agg = "sequence"  # sequence (GRPO) | token (DAPO) | constant (Dr. GRPO)
scale_rewards = "group"  # group (GRPO) | batch | none (Dr. GRPO)
importance_sampling = "token"  # token (GRPO/PPO) | sequence (GSPO)
beta = 0.0  # weight of the k3 KL to a frozen reference model; 0 loads no reference model at all
ref_update_every = 0  # >0: reset the reference to the policy every this many steps
dynamic_sampling = 0  # 1 (DAPO): drop groups whose rewards are all equal, sample more prompts to refill the batch
max_sampling_rounds = 4  # dynamic sampling: at most this many generation rounds per step (then train on what is kept)
overlong = "none"  # none | mask (truncated completions leave the loss) | soft (DAPO's length penalty on the reward)
overlong_buffer = 32  # soft: the last this many tokens before max_completion_len are penalised linearly
max_prompt_len = 256  # longer prompts are skipped and counted
max_completion_len = 128
temperature = 1.0
top_p = 1.0
top_k = 0
ignore_eos = 0  # 1 (benchmarks): every completion runs to max_completion_len
sample_every = 40  # print a few completions every this many steps (0: never)
logp_chunk = 1024  # positions per chunk of the training log-probs (peak logits memory = logp_chunk x vocab)
grad_checkpointing = 0
fsdp = 0  # 1 (torchrun): FSDP2 shards the policy's parameters, gradients and AdamW state over the ranks
sample_dtype = "auto"  # rollout weights: auto (bf16 copy of the policy on cuda, the policy itself on cpu) | float32
cuda_graphs = 1
dtype = "auto"  # training compute: auto (bf16 autocast on cuda, fp32 on cpu) | float32 | bfloat16
device = "auto"
out_dir = "out/grpo"
save_every = 0  # 0: only at the end
resume = 0
stop_after = 0  # >0: exit right after step k without the final save, like a crash (resume tests)
seed = 1337
skip_bad_rows = 0
progress = 1
CONFIG_KEYS = [k for k in globals() if k not in _globals_before_config and not k.startswith("_")]
# -----------------------------------------------------------------------------

CHOICES = dict(loss_agg=("sequence", "token", "constant"), scale_rewards=("group", "batch", "none"),
               importance_sampling=("token", "sequence"), overlong=("none", "mask", "soft"),
               prompt_template=PROMPT_TEMPLATES, sample_dtype=("auto", "float32", "bfloat16"))


def configure(argv):
    """Module defaults, then recipe files and --key=value arguments in order; checks the values that parse_overrides
    cannot (choices, ranges, reward names)."""
    cfg = Config(parse_overrides(argv, {k: globals()[k] for k in CONFIG_KEYS}))
    for key, choices in CHOICES.items():
        if cfg[key] not in choices:
            raise SystemExit(f"--{key}={cfg[key]}: expected one of {', '.join(choices)}")
    if cfg.group_size < 2:
        raise SystemExit(f"--group_size={cfg.group_size}: GRPO needs at least 2 samples per prompt (advantages are "
                         "relative to the group)")
    for key in ("prompts_per_step", "max_steps", "ppo_epochs", "minibatches", "micro_batch_size",
                "max_completion_len", "max_sampling_rounds"):
        if cfg[key] < 1:
            raise SystemExit(f"--{key}={cfg[key]}: must be >= 1")
    if cfg.overlong == "soft" and not 0 < cfg.overlong_buffer < cfg.max_completion_len:
        raise SystemExit(f"--overlong_buffer={cfg.overlong_buffer}: needs 0 < buffer < max_completion_len")
    try:
        combine_rewards(cfg.rewards)
    except ValueError as e:
        raise SystemExit(f"--rewards={cfg.rewards}: {e}") from None
    return cfg


# -----------------------------------------------------------------------------
# the algorithm: advantages, KL estimator, clipped surrogate


def group_advantages(rewards, group_size, scale="group", eps=1e-4):
    """Group-relative advantages, one per completion. rewards: 1-D, prompt-major (rows i*G .. i*G+G-1 are
    prompt i's group).
    group: (r - group mean) / (group std + eps)   -- GRPO, DeepSeekMath eq. 3 (outcome supervision)
    batch: (r - group mean) / (batch std + eps)   -- std over every reward of the batch
    none:  r - group mean                         -- Dr. GRPO (arXiv 2503.20783, sec. 3.1): no std division
    std with Bessel's correction. A group whose rewards are all equal gets exactly 0 (it carries no signal)."""
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: need at least 2 samples per group")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)}: expected 1-D with a multiple of {group_size} "
                         "entries")
    r = rewards.view(-1, group_size)
    centered = r - r.mean(-1, keepdim=True)
    if scale == "group":
        centered = centered / (r.std(-1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (rewards.std() + eps)
    elif scale != "none":
        raise ValueError(f"scale={scale!r}: expected group, batch or none")
    flat = (r == r[:, :1]).all(-1, keepdim=True)  # mean() of equal floats can be 1 ulp off: force exact zeros
    return torch.where(flat, torch.zeros_like(centered), centered).reshape(-1)


def kl_k3(logprobs, ref_logprobs):
    """Per-token k3 estimate of KL(pi_theta || pi_ref): pi_ref/pi_theta - log(pi_ref/pi_theta) - 1, unbiased and
    >= 0 (DeepSeekMath eq. 4; Schulman, "Approximating KL divergence")."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_eps_low=0.2, clip_eps_high=0.2, beta=0.0,
              loss_agg="sequence", importance_sampling="token", max_completion_len=None, normalizer=None):
    """The clipped GRPO surrogate, negated (a loss to minimise), and stats.

    logprobs, old_logprobs, ref_logprobs (None when beta == 0), mask: [B, T]; advantages: [B].
    ratio, importance_sampling="token" (GRPO, DeepSeekMath eq. 3):  rho_t = exp(lp_t - old_t)
           importance_sampling="sequence" (GSPO, arXiv 2507.18071 eq. 7): rho = exp(sum_t m_t (lp_t - old_t) / |o|),
           one ratio per completion, broadcast to its tokens
    objective per token: min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) - beta k3   (DAPO's clip-higher:
           eps_high > eps_low, arXiv 2503.14476 eq. 10)
    loss = -(sum of the objective over mask) / normaliser, aggregated by loss_agg:
      sequence (GRPO):     each row's token mean, summed over rows; normaliser = rows with any masked token
      token (DAPO eq. 12): summed over every token; normaliser = number of masked tokens
      constant (Dr. GRPO): summed over every token; normaliser = rows x max_completion_len
    normalizer: divide by this instead of the batch's own count, so micro-batches and ranks that each pass the
    global count sum to exactly the one-batch gradient.
    stats (floats): clip_frac_low / clip_frac_high / clip_frac (fraction of masked tokens whose clip is active),
    kl (token mean of k3 to the reference, or to pi_old without one), ratio_max, tokens."""
    keep = mask.bool()  # values past a row's end can be anything (even -inf): zero them before exp()
    logprobs, old_logprobs = logprobs.masked_fill(~keep, 0.0), old_logprobs.masked_fill(~keep, 0.0)
    ref_logprobs = None if ref_logprobs is None else ref_logprobs.masked_fill(~keep, 0.0)
    mask = mask.to(logprobs.dtype)
    lens = mask.sum(-1)
    log_ratio = logprobs - old_logprobs
    if importance_sampling == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / lens.clamp(min=1))[:, None].expand_as(logprobs)
    elif importance_sampling != "token":
        raise ValueError(f"importance_sampling={importance_sampling!r}: expected token or sequence")
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logprobs.dtype)[:, None]
    objective = torch.min(ratio * adv, ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high) * adv)
    kl = kl_k3(logprobs, ref_logprobs if ref_logprobs is not None else old_logprobs)
    if beta:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs ref_logprobs")
        objective = objective - beta * kl
    objective = objective * mask
    if loss_agg == "sequence":
        total, count = (objective.sum(-1) / lens.clamp(min=1)).sum(), (lens > 0).sum()
    elif loss_agg == "token":
        total, count = objective.sum(), lens.sum()
    elif loss_agg == "constant":
        if not max_completion_len:
            raise ValueError("loss_agg='constant' needs max_completion_len")
        total, count = objective.sum(), logprobs.shape[0] * max_completion_len
    else:
        raise ValueError(f"loss_agg={loss_agg!r}: expected sequence, token or constant")
    loss = -total / (normalizer if normalizer is not None else max(float(count), 1.0))
    with torch.no_grad():
        n = float(mask.sum())
        low = ((ratio < 1 - clip_eps_low) & (adv < 0)).to(mask.dtype) * mask
        high = ((ratio > 1 + clip_eps_high) & (adv > 0)).to(mask.dtype) * mask
        stats = dict(clip_frac_low=float(low.sum()) / max(n, 1), clip_frac_high=float(high.sum()) / max(n, 1),
                     kl=float((kl * mask).sum()) / max(n, 1), tokens=n,
                     ratio_max=float(ratio.masked_fill(mask == 0, 0).max()) if n else 1.0)
        stats["clip_frac"] = stats["clip_frac_low"] + stats["clip_frac_high"]
    return loss, stats


def overlong_penalty(length, max_len, buffer):
    """DAPO's soft overlong punishment (arXiv 2503.14476 eq. 13): 0 up to max_len - buffer, then falling linearly
    to -1 at max_len (and -1 beyond)."""
    if length <= max_len - buffer:
        return 0.0
    if length <= max_len:
        return ((max_len - buffer) - length) / buffer
    return -1.0


# -----------------------------------------------------------------------------
# log-probs of completions under a model

def completion_logprobs(model, rows, pad_id, chunk, temperature, device):
    """Per-token log-probs of each row's completion given its prompt. rows: (prompt ids, completion ids) pairs.
    -> [B, Tc] fp32 (0 past a row's end). The batch is right-padded and needs no attention mask: under causal
    attention padding after a row's tokens never reaches them (a 2-D mask would take the slower masked path).
    Only completion positions go through the lm_head, in chunks: never a [B, T, vocab] tensor."""
    B = len(rows)
    T = max(len(p) + len(c) for p, c in rows)
    Tc = max(len(c) for _, c in rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.zeros((B, Tc), dtype=torch.long)
    pos = torch.zeros((B, Tc), dtype=torch.long)
    for b, (p, c) in enumerate(rows):
        ids[b, :len(p) + len(c)] = torch.tensor(list(p) + list(c))
        targets[b, :len(c)] = torch.tensor(c)
        pos[b] = (len(p) - 1 + torch.arange(Tc)).clamp(max=T - 1)  # position t predicts completion token t
    ids, targets, pos = ids.to(device), targets.to(device), pos.to(device)
    hidden = model(ids, return_hidden=True)
    h = hidden.gather(1, pos[..., None].expand(B, Tc, hidden.shape[-1]))
    past_end = torch.arange(Tc, device=device)[None] >= torch.tensor([len(c) for _, c in rows], device=device)[:, None]
    return chunked_token_logprobs(h, model.lm_head.weight, targets, chunk, temperature).masked_fill(past_end, 0.0)


# -----------------------------------------------------------------------------
# data: prompt rows that carry what the rewards need

REQUIRED_FIELDS = {"accuracy": ("answer",), "countdown": ("numbers", "target"), "code": ("tests",)}
RULE_FIELDS = ("answer", "tests", "numbers", "target")  # with --reward_model: a row with none of these goes to the RM


def rule_scored(row):
    """Whether the rule rewards score this row (it carries something to check); else, with --reward_model, the RM."""
    return any(f in row for f in RULE_FIELDS)


def load_prompt_sources(spec, tok, cfg, reward_names, log, rm_rows=False):
    """-> (one list per file of {"where", "row", "ids"}, weights or None, stats). Rows need `prompt` (string) or
    `messages` (list) and the fields their rewards use; bad rows stop the run with file:line (or are skipped
    and counted with skip_bad_rows); prompts longer than max_prompt_len are skipped and counted.
    rm_rows (--reward_model): a row with no rule field (RULE_FIELDS) is fine, the reward model scores it."""
    files = parse_data_spec(spec)
    need = sorted({f for name in reward_names for f in REQUIRED_FIELDS.get(name, ())})
    sources, stats = [], dict(rows=0, too_long=0, bad=0, rm=0)
    for path, _ in files:
        items = []
        for where, row in read_rows(path, cfg.skip_bad_rows):
            stats["rows"] += 1
            error = None
            by_rm = rm_rows and not rule_scored(row)
            missing = [] if by_rm else [f for f in need if f not in row]
            if not isinstance(row.get("prompt"), str) and not isinstance(row.get("messages"), list):
                error = f"{where}: needs 'prompt' (a string) or 'messages' (a list)"
            elif missing:
                error = (f"{where}: missing field(s) {', '.join(map(repr, missing))} (needed by --rewards={cfg.rewards}"
                         f"{'' if rm_rows else '; or pass --reward_model=DIR to score rows without them'})")
            if error:
                if not cfg.skip_bad_rows:
                    raise ValueError(error)
                stats["bad"] += 1
                continue
            ids = encode_problem(tok, row, cfg.prompt_template)
            if len(ids) > cfg.max_prompt_len:
                stats["too_long"] += 1
                continue
            items.append({"where": where, "row": row, "ids": ids})
            stats["rm"] += by_rm
        if not items:
            raise ValueError(f"{path}: no usable prompts ({stats['too_long']} longer than max_prompt_len="
                             f"{cfg.max_prompt_len})")
        sources.append(items)
    if stats["too_long"]:
        log(f"warning: skipped {stats['too_long']} prompt(s) longer than max_prompt_len={cfg.max_prompt_len}")
    if stats["bad"]:
        log(f"warning: skipped {stats['bad']} bad row(s) (--skip_bad_rows=1)")
    return sources, (None if files[0][1] is None else [w for _, w in files]), stats


# -----------------------------------------------------------------------------
# the reward model (--reward_model)


class RewardModelScorer:
    """A frozen model.RewardModel scoring prompt + completion, for the rows the rule rewards cannot check: batched
    (right-padded, with an attention mask), in inference mode, on the training device (bf16 on CUDA), never updated.
    scorer(pairs of (problem row, completion text)) -> raw scores; a row's reward is weight x score.

    It encodes with the policy's tokenizer, so it must have been trained with that one: its vocabulary must cover
    the policy's ids, and a tokenizer.json in its directory must have the same vocabulary; anything else is refused
    with a clear error."""

    def __init__(self, path, tok, weight, device, dtype, batch_size):
        try:
            self.model = RewardModel.from_pretrained(path, dtype=dtype, device=device).eval()
        except (KeyError, ValueError, FileNotFoundError) as e:  # e.g. a causal LM dir: no score.weight
            raise SystemExit(f"--reward_model={path}: {e.args[0] if isinstance(e, KeyError) else e}") from None
        self.model.requires_grad_(False)
        if self.model.num_labels != 1:
            raise SystemExit(f"--reward_model={path}: {self.model.num_labels} labels; a reward model has one score")
        if self.model.config.vocab_size < tok.vocab_size:
            raise SystemExit(f"--reward_model={path}: its vocabulary ({self.model.config.vocab_size} ids) does not "
                             f"cover the policy tokenizer's {tok.vocab_size}; it must use the policy's tokenizer")
        rm_tok = os.path.join(path, "tokenizer.json")
        if os.path.isfile(rm_tok):
            from tokenizers import Tokenizer as RustTokenizer
            if RustTokenizer.from_file(rm_tok).get_vocab(True) != tok._tok.get_vocab(True):
                raise SystemExit(f"--reward_model={path}: {rm_tok} is not the policy's tokenizer "
                                 f"({tok.config_path.parent}); the RM reads the policy's token ids")
        self.weight, self.device, self.batch_size = weight, device, batch_size
        self.tok, self.pad_id = tok, tok.pad_id

    def inputs(self, row, text):
        """The RM's input ids: exactly what train_sft --mode=rm trained it on (train_sft.reward_model_input), the
        problem's conversation plus the completion's text as the closed assistant turn. The text is re-tokenised
        rather than the sampled ids reused, so the RM sees the same encoding (and turn ending) as in training."""
        return reward_model_input(self.tok, prompt_messages(row) + [{"role": "assistant", "content": text}])

    def __call__(self, pairs):
        seqs = [self.inputs(p, c) for p, c in pairs]
        scores = []
        for s in range(0, len(seqs), self.batch_size):
            chunk = seqs[s:s + self.batch_size]
            ids = torch.full((len(chunk), max(map(len, chunk))), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, x in enumerate(chunk):
                ids[b, :len(x)], mask[b, :len(x)] = torch.tensor(x), 1
            with torch.inference_mode():
                scores += self.model(ids.to(self.device), attention_mask=mask.to(self.device)).float().tolist()
        return scores


# -----------------------------------------------------------------------------
# rollouts


def row_seed(seed, step, draw, j, group_size):
    """Sampling seed of sample j of the step's draw-th prompt: a function of the global position only, so any
    number of ranks (and a resumed run) samples exactly the same completions."""
    return (seed * 1_000_003 + step) * 2**24 + draw * group_size + j


def generate_groups(engine, items, first_draw, step, cfg, rt, reward_fn, gen, rm=None):
    """Sample and score a group for each item (this rank takes items k % world == rank): by reward_fn, or with a
    RewardModelScorer `rm`, rows without rule fields by it (one batched pass over this rank's RM rows; parts
    {"rm": score}). -> the groups of all ranks in draw order, each {"draw", "prompt", "item", "samples": [{tokens,
    logprobs, finish, reward, parts, text}]}, and this rank's generated token count."""
    mine = list(range(rt.rank, len(items), rt.world))
    out, n_tok = [], 0
    if mine:
        G = cfg.group_size
        seeds = [row_seed(cfg.seed, step, first_draw + k, j, G) for k in mine for j in range(G)]
        completions = engine.generate([items[k]["ids"] for k in mine], num_samples=G, seed=seeds, **gen)
        by_rm = [rm is not None and not rule_scored(items[k]["row"]) for k in mine]
        pairs = [(items[k]["row"], c.text) for k, group, r in zip(mine, completions, by_rm) if r for c in group]
        rm_scores = iter(rm(pairs) if pairs else [])
        for k, group, r in zip(mine, completions, by_rm):
            samples = []
            for c in group:
                if r:
                    score = next(rm_scores)
                    total, parts = rm.weight * score, {"rm": score}
                else:
                    total, parts = reward_fn(c.text, items[k]["row"])
                if cfg.overlong == "soft":
                    parts["overlong"] = overlong_penalty(len(c.tokens), cfg.max_completion_len, cfg.overlong_buffer)
                    total += parts["overlong"]
                if "accuracy" not in parts and "answer" in items[k]["row"]:
                    acc = accuracy_reward(c.text, items[k]["row"]["answer"])
                else:
                    acc = parts.get("accuracy")
                samples.append(dict(tokens=c.tokens, logprobs=c.logprobs, finish=c.finish_reason, reward=total,
                                    parts=parts, accuracy=acc, text=c.text))
                n_tok += len(c.tokens)
            out.append(dict(draw=first_draw + k, item=items[k], samples=samples))
    if rt.ddp:
        parts = [None] * rt.world
        dist.all_gather_object(parts, [{**g, "item": None} for g in out])  # every rank has the items already
        out = sorted((g for p in parts for g in p), key=lambda g: g["draw"])
        for g in out:
            g["item"] = items[g["draw"] - first_draw]
    return out, n_tok


def collect_rollouts(engine, stream, step, cfg, rt, reward_fn, gen, rm=None):
    """One step's groups. Without dynamic sampling: prompts_per_step fresh prompts. With it (DAPO): groups whose
    rewards are all equal are dropped and more prompts are drawn until prompts_per_step groups are kept or
    max_sampling_rounds rounds were run. -> (groups, info)."""
    kept, drawn, dropped, rounds, n_tok = [], 0, 0, 0, 0
    while len(kept) < cfg.prompts_per_step and rounds < cfg.max_sampling_rounds:
        items = [r[0] for r in stream.take(cfg.prompts_per_step - len(kept))]
        groups, n = generate_groups(engine, items, drawn, step, cfg, rt, reward_fn, gen, rm)
        drawn, rounds, n_tok = drawn + len(items), rounds + 1, n_tok + n
        if not cfg.dynamic_sampling:
            kept = groups
            break
        for g in groups:
            rewards = [s["reward"] for s in g["samples"]]
            if max(rewards) == min(rewards):
                dropped += 1
            else:
                kept.append(g)
    return kept, dict(sampling_rounds=rounds, groups_dropped=dropped, prompts_drawn=drawn, gen_tokens=n_tok)


# -----------------------------------------------------------------------------
# the update


def policy_update(policy, ref_model, optimizer, rows, cfg, rt, pad_id, step):
    """ppo_epochs x minibatches optimizer steps over the rollout rows (global list of dicts with prompt, tokens,
    logprobs (sampler), adv, mask). Returns the stats of the step."""
    B = len(rows)
    recompute_old = cfg.ppo_epochs * cfg.minibatches > 1
    stats = dict(clip_low=0.0, clip_high=0.0, kl=0.0, tokens=0.0, ratio_max=0.0, logp_mismatch=0.0,
                 time_logp=0.0, trained_rows=0, loss=0.0)
    params = [p for p in policy.parameters() if p.requires_grad]

    def batch_logprobs(model, idx):
        return completion_logprobs(model, [(rows[i]["prompt"], rows[i]["tokens"]) for i in idx], pad_id,
                                   cfg.logp_chunk, cfg.temperature, rt.device)

    def padded(key, idx):
        T = max(len(rows[i]["tokens"]) for i in idx)
        out = torch.zeros(len(idx), T, dtype=torch.float32)
        for b, i in enumerate(idx):
            out[b, :len(rows[i][key])] = torch.tensor(rows[i][key], dtype=torch.float32)
        return out.to(rt.device)

    def passes(most, mine):
        """Micro-batches this rank runs: under FSDP every rank runs as many as the rank with the most rows (`most`),
        since each forward all-gathers and each backward reduce-scatters together with the other ranks."""
        return -(-(most if cfg.fsdp else mine) // cfg.micro_batch_size)

    def mismatch(lp, idx):
        m = padded("mask_all", idx)
        return float(((lp.float() - padded("logprobs", idx)).abs() * m).max()) if m.any() else 0.0

    # ---- no-grad passes: the trainer's own log pi_old (when the policy moves within a step) and log pi_ref
    old, ref = {}, {}
    t0 = time.time()
    need_old = list(range(rt.rank, B, rt.world)) if recompute_old else []
    n_old = passes(-(-B // rt.world) if recompute_old else 0, len(need_old))  # most rows a rank has: ceil(B / world)
    with torch.no_grad(), rt.autocast():
        for s in range(0, n_old * cfg.micro_batch_size, cfg.micro_batch_size):
            idx = need_old[s:s + cfg.micro_batch_size]
            if not idx:  # FSDP padding pass (see passes)
                batch_logprobs(policy, [0])
                continue
            lp = batch_logprobs(policy, idx).float()
            stats["logp_mismatch"] = max(stats["logp_mismatch"], mismatch(lp, idx))
            old.update({i: lp[b, :len(rows[i]["tokens"])].cpu() for b, i in enumerate(idx)})
    if cfg.fsdp and n_old:  # FSDP2 keeps the root's parameters gathered after a forward, for the backward that
        policy.reshard()  # follows a training one: after no-grad passes free them (.parameters() are shards again)
    if recompute_old and rt.ddp:
        parts = [None] * rt.world
        dist.all_gather_object(parts, old)
        old = {i: v for p in parts for i, v in p.items()}
    stats["time_logp"] += time.time() - t0

    # rows whose advantage is exactly 0 carry no gradient when beta == 0: skip them (still in the normaliser)
    active = {i for i in range(B) if cfg.beta > 0 or rows[i]["adv"] != 0.0}
    gen = np.random.default_rng([cfg.seed, step])
    for epoch in range(cfg.ppo_epochs):
        order = gen.permutation(B) if cfg.minibatches > 1 else np.arange(B)
        for mb in np.array_split(order, cfg.minibatches):
            mb = sorted(int(i) for i in mb)
            lens = [sum(rows[i]["mask"]) for i in mb]
            normalizer = {"sequence": sum(n > 0 for n in lens), "token": sum(lens),
                          "constant": len(mb) * cfg.max_completion_len}[cfg.loss_agg]
            trained = [i for i in mb if i in active]
            mine = trained[rt.rank::rt.world]
            for s in range(0, passes(len(trained[::rt.world]), len(mine)) * cfg.micro_batch_size,
                           cfg.micro_batch_size):
                idx = mine[s:s + cfg.micro_batch_size]
                pad = not idx  # an FSDP padding pass: a row of the minibatch, with zero weight
                idx = idx or trained[:1]
                with rt.autocast():
                    lp = batch_logprobs(policy, idx).float()
                ref_lp = None
                if ref_model is not None:
                    t1 = time.time()
                    missing = [i for i in idx if i not in ref]
                    if missing:
                        with torch.no_grad(), rt.autocast():
                            r = batch_logprobs(ref_model, missing).float()
                        ref.update({i: r[b, :len(rows[i]["tokens"])] for b, i in enumerate(missing)})
                    ref_lp = torch.zeros_like(lp)
                    for b, i in enumerate(idx):
                        ref_lp[b, :len(ref[i])] = ref[i]
                    stats["time_logp"] += time.time() - t1
                if recompute_old:
                    old_lp = torch.zeros_like(lp)
                    for b, i in enumerate(idx):
                        old_lp[b, :len(old[i])] = old[i].to(lp.device)
                else:  # one optimizer step per rollout batch: pi_old is the current policy (ratio 1, gradient not 0)
                    old_lp = lp.detach()
                    stats["logp_mismatch"] = max(stats["logp_mismatch"], mismatch(lp.detach(), idx))
                adv = torch.tensor([rows[i]["adv"] for i in idx], device=lp.device)
                loss, st = grpo_loss(lp, old_lp, ref_lp, adv, padded("mask", idx), cfg.clip_eps_low,
                                     cfg.clip_eps_high, cfg.beta, cfg.loss_agg, cfg.importance_sampling,
                                     cfg.max_completion_len, normalizer=max(float(normalizer), 1.0))
                # a padding pass weighs 0; x world under FSDP2, which averages the gradients over ranks where the
                # hand all-reduce below sums them
                (loss * (0.0 if pad else (rt.world if cfg.fsdp else 1))).backward()
                if pad:
                    continue
                stats["loss"] += loss.item()
                stats["trained_rows"] += len(idx)
                for k in ("clip_low", "clip_high", "kl"):
                    stats[k] += st[{"clip_low": "clip_frac_low", "clip_high": "clip_frac_high", "kl": "kl"}[k]] * \
                        st["tokens"]
                stats["tokens"] += st["tokens"]
                stats["ratio_max"] = max(stats["ratio_max"], st["ratio_max"])
            # ---- one optimizer step: grads summed over ranks (each loss was divided by the global normaliser).
            # A minibatch in which no rank trained a row is no step at all (AdamW's moments would still move
            # the weights), on every rank alike.
            if not rt.all_sum(float(any(p.grad is not None for p in params))):
                continue
            if rt.ddp and not cfg.fsdp:  # (FSDP2 has reduce-scattered them already)
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                works = [dist.all_reduce(p.grad, async_op=True) for p in params]
                for w in works:
                    w.wait()
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(
                params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if rt.ddp:  # the stats are sums over this rank's micro-batches: add them up
        keys = ["clip_low", "clip_high", "kl", "tokens", "trained_rows", "loss", "time_logp"]
        vals = rt.all_sum([stats[k] for k in keys])
        stats.update(zip(keys, vals))
        t = torch.tensor([stats["ratio_max"], stats["logp_mismatch"]], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        stats["ratio_max"], stats["logp_mismatch"] = t.tolist()
        stats["time_logp"] /= rt.world
    n = max(stats["tokens"], 1.0)
    return dict(clip_frac_low=stats["clip_low"] / n, clip_frac_high=stats["clip_high"] / n,
                clip_frac=(stats["clip_low"] + stats["clip_high"]) / n, kl=stats["kl"] / n,
                ratio_max=stats["ratio_max"], logp_mismatch=stats["logp_mismatch"], loss=stats["loss"],
                grad_norm=stats.get("grad_norm", 0.0), trained_rows=int(stats["trained_rows"]),
                time_logp=stats["time_logp"])


def rollout_rows(groups, cfg):
    """Groups -> (flat rows for the update, the step's rollout metrics)."""
    samples = [s for g in groups for s in g["samples"]]
    prompts = [g["item"]["ids"] for g in groups for _ in g["samples"]]
    rewards = torch.tensor([s["reward"] for s in samples], dtype=torch.float64)
    adv = group_advantages(rewards, cfg.group_size, cfg.scale_rewards) if samples else rewards
    rows = []
    for prompt, s, a in zip(prompts, samples, adv.tolist()):
        keep = 0 if (s["finish"] == "length" and cfg.overlong == "mask") else 1  # DAPO overlong filtering
        rows.append(dict(prompt=prompt, tokens=s["tokens"], logprobs=s["logprobs"], mask=[keep] * len(s["tokens"]),
                         mask_all=[1] * len(s["tokens"]), adv=a))
    lens = [len(s["tokens"]) for s in samples]
    rec = {"reward": float(rewards.mean()) if samples else 0.0}  # the mean total, over every sample
    # each component is the mean over the samples it scored (rule parts over rule-scored rows, rm over RM-scored
    # ones), so mixing the two sources does not dilute either
    for name in dict.fromkeys(n for s in samples for n in s["parts"]):
        vals = [s["parts"][name] for s in samples if name in s["parts"]]
        rec[f"reward/{name}"] = sum(vals) / len(vals)
    accs = [s["accuracy"] for s in samples if s["accuracy"] is not None]
    if accs:
        rec["accuracy"] = sum(accs) / len(accs)
    if samples:
        n_flat = sum(max(s["reward"] for s in g["samples"]) == min(s["reward"] for s in g["samples"]) for g in groups)
        all_lp = [lp for s in samples for lp in s["logprobs"]]
        rec.update(completion_len=sum(lens) / len(lens), completion_len_max=max(lens),
                   truncated_frac=sum(s["finish"] == "length" for s in samples) / len(samples),
                   zero_std_frac=n_flat / len(groups),
                   # the mean surprisal of the sampled tokens: a Monte-Carlo estimate of the sampling policy's
                   # per-token entropy (exact in expectation with top_p = 1, top_k = 0), free from the sampler
                   entropy=-sum(all_lp) / max(len(all_lp), 1))
    return rows, rec


# -----------------------------------------------------------------------------
# evaluation, plots


def held_out_accuracy(engine, problems, prompts, cfg, rt, gen):
    """Greedy pass@1 over the held-out problems, through sample.py's eval code."""
    greedy = {**gen, "temperature": 0.0}
    results, _ = score_problems(engine, problems, prompts, 1, greedy, seed=cfg.seed, batch_size=64, rank=rt.rank,
                                world=rt.world, progress=False)
    return pass_at_1([[s["correct"] for s in rows] for rows in results])


def held_out_rm_score(engine, items, rm, cfg, rt, gen, batch_size=64):
    """Mean reward-model score of greedy completions of held-out prompts (R1 stage 4's measure on general prompts,
    which no rule checks); each rank scores its share (items k % world == rank) and the sums are all-reduced."""
    greedy = {**gen, "temperature": 0.0}
    mine = items[rt.rank::rt.world]
    total = 0.0
    for s in range(0, len(mine), batch_size):
        part = mine[s:s + batch_size]
        outs = engine.generate([it["ids"] for it in part], num_samples=1, seed=cfg.seed, **greedy)
        total += sum(rm([(it["row"], out[0].text) for it, out in zip(part, outs)]))
    return rt.all_sum(total) / max(len(items), 1)


def ascii_plot(series, width=60, height=11):
    """series: {name: [(step, value in [0, 1])]} -> lines of a text plot, one marker letter per series."""
    steps = [s for pts in series.values() for s, _ in pts]
    if not steps:
        return []
    lo, hi = min(steps), max(max(steps), min(steps) + 1)
    grid = [[" "] * width for _ in range(height)]
    for name, pts in series.items():
        for s, v in pts:
            x = round((s - lo) / (hi - lo) * (width - 1))
            y = height - 1 - round(min(max(v, 0.0), 1.0) * (height - 1))
            grid[y][x] = name[0]
    lines = [f"{1 - i / (height - 1):4.1f} |" + "".join(row) for i, row in enumerate(grid)]
    lines.append("     +" + "-" * width)
    lines.append(f"      step {lo}" + " " * max(1, width - 12 - len(str(hi))) + f"step {hi}")
    lines.append("      " + "   ".join(f"{n[0]} = {n}" for n in series))
    return lines


def peak_mem_mb(rt):
    if rt.dev_type == "cuda":
        return torch.cuda.max_memory_allocated(rt.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# -----------------------------------------------------------------------------


def main(argv=None):
    cfg = configure(sys.argv[1:] if argv is None else argv)
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    log = rt.log
    ckpt_path = os.path.join(cfg.out_dir, "ckpt")
    resume_from = find_checkpoint(ckpt_path) if cfg.resume else None
    if cfg.resume and resume_from is None:
        log(f"--resume=1 but no checkpoint in {ckpt_path}; starting fresh")
    tok_dir = resume_from or cfg.init_from
    if not os.path.isfile(os.path.join(cfg.init_from, "config.json")):
        raise SystemExit(f"--init_from={cfg.init_from}: no config.json (expected an HF-layout checkpoint directory)")
    tok = Tokenizer.from_pretrained(tok_dir)
    reward_fn = combine_rewards(cfg.rewards)
    try:
        sources, weights, dstats = load_prompt_sources(cfg.data, tok, cfg, reward_fn.weights, log,
                                                       rm_rows=bool(cfg.reward_model))
        eval_problems = []
        if cfg.eval_every and cfg.eval_data:
            eval_sources, _, _ = load_prompt_sources(cfg.eval_data, tok, Config({**cfg, "rewards": "accuracy"}),
                                                     ["accuracy"], lambda *a: None)
            eval_problems = [it for src in eval_sources for it in src][:cfg.eval_n]
        eval_rm_items = []
        if cfg.eval_every and cfg.eval_rm_data:
            if not cfg.reward_model:
                raise ValueError(f"--eval_rm_data={cfg.eval_rm_data}: needs --reward_model=DIR to score it")
            rm_sources, _, _ = load_prompt_sources(cfg.eval_rm_data, tok, cfg, [], lambda *a: None, rm_rows=True)
            eval_rm_items = [it for src in rm_sources for it in src][:cfg.eval_rm_n]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    stream = RowStream(sources, weights, 0, cfg.seed, do_pack=False)
    to_rm = f"; {dstats['rm']} for the reward model" if cfg.reward_model else ""
    log(f"data: {sum(map(len, sources))} prompts from {len(sources)} file(s) ({dstats['too_long']} too long, "
        f"{dstats['bad']} bad{to_rm}); {len(eval_problems)} held-out problems"
        f"{f', {len(eval_rm_items)} held-out RM prompts' if eval_rm_items else ''}")

    # ---- models: fp32 master weights (bf16 compute comes from autocast); a frozen reference only when beta > 0
    policy = Transformer.from_pretrained(resume_from or cfg.init_from, dtype=torch.float32, device=rt.device)
    policy.gradient_checkpointing = bool(cfg.grad_checkpointing)
    ref_model = None
    if cfg.beta > 0:
        ref_model = Transformer.from_pretrained(cfg.init_from, dtype=torch.float32, device=rt.device).eval()
        ref_model.requires_grad_(False)
    sample_dtype = {"auto": torch.bfloat16 if rt.dev_type == "cuda" else torch.float32, "float32": torch.float32,
                    "bfloat16": torch.bfloat16}[cfg.sample_dtype]
    # rollouts: the policy itself, or a low-precision copy (or under FSDP an unsharded one) refreshed in place after
    # every update (CUDA graphs keep the addresses of its tensors, so it is copied into, never rebuilt)
    own_sampler = sample_dtype != torch.float32 or cfg.fsdp
    sampler = copy.deepcopy(policy).to(sample_dtype).eval() if own_sampler else policy
    sampler.requires_grad_(sampler is policy)
    rm = None
    if cfg.reward_model:  # frozen, unsharded on every rank (it scores that rank's groups)
        rm = RewardModelScorer(cfg.reward_model, tok, cfg.reward_model_weight, rt.device,
                               torch.bfloat16 if rt.dev_type == "cuda" else torch.float32, cfg.micro_batch_size)
    if cfg.fsdp:
        shard_model(policy)  # in place, after the sampler copy and before the optimizer (it holds the DTensor shards)
    optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), fused=rt.dev_type == "cuda")
    step, history = 0, {"accuracy": [], "reward": [], "rm_score": []}
    if resume_from:
        state = load_trainer_state(resume_from, mmap=bool(cfg.fsdp))
        load_optimizer_state(policy, optimizer, state["optimizer"], cfg.fsdp, state.get("fsdp", False))
        step, history = state["step"], state["history"]
        stream.epoch, stream.pos = state["data"]["epoch"], state["data"]["pos"]
        if ref_model is not None and state.get("ref") is not None:
            ref_model.load_state_dict(state["ref"])
        set_rng_state(state["rng"][rt.rank] if rt.rank < len(state["rng"]) else state["rng"][0])
        log(f"resumed from {resume_from} at step {step}")
    engine = Engine(sampler, tok, cuda_graphs=bool(cfg.cuda_graphs) and rt.dev_type == "cuda")
    gen = dict(max_new_tokens=cfg.max_completion_len, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
               ignore_eos=bool(cfg.ignore_eos), stop=["</answer>"] if cfg.prompt_template == "r1zero" else None)
    eval_prompts = [it["ids"] for it in eval_problems]
    eval_rows = [it["row"] for it in eval_problems]
    rm_info = f"; reward model {cfg.reward_model} ({rm.model.num_params() / 1e6:.2f}M, x{rm.weight})" if rm else ""
    log(f"model: {policy.num_params() / 1e6:.2f}M params; device {rt.device}, world {rt.world}, "
        f"{'bf16 autocast' if rt.amp_dtype else 'fp32'} training{', FSDP2-sharded' if cfg.fsdp else ''}, "
        f"{sample_dtype} rollouts; "
        f"reference model: {'yes' if ref_model is not None else 'none (beta=0)'}{rm_info}")

    metrics = MetricsFile(cfg.out_dir, rt.master, step if resume_from else None)
    flops_per_tok = policy.flops_per_token(cfg.max_prompt_len + cfg.max_completion_len)
    peak = peak_flops(torch.cuda.get_device_name(rt.device)) * rt.world if rt.dev_type == "cuda" else None

    def evaluate(at_step):
        acc = None
        if eval_problems:
            t0 = time.time()
            acc = held_out_accuracy(engine, eval_rows, eval_prompts, cfg, rt, gen)
            history["accuracy"].append((at_step, acc))
            log(f"step {at_step}: held-out greedy pass@1 {100 * acc:.1f}% ({len(eval_problems)} problems, "
                f"{time.time() - t0:.1f}s)")
        if eval_rm_items:
            t0 = time.time()
            score = held_out_rm_score(engine, eval_rm_items, rm, cfg, rt, gen)
            history.setdefault("rm_score", []).append((at_step, score))
            log(f"step {at_step}: held-out reward-model score {score:.3f} (greedy, {len(eval_rm_items)} prompts, "
                f"{time.time() - t0:.1f}s)")
        return acc

    def checkpoint():
        rngs = all_rng_states(rt)
        weights = full_state_dict(policy) if cfg.fsdp else None  # collectives: on every rank
        opt_state = optimizer_state(policy, optimizer, cfg.fsdp)
        if rt.master:
            save_checkpoint(ckpt_path, policy, tok_dir, {
                "optimizer": opt_state, "step": step, "data": stream.state(), "rng": rngs, "fsdp": bool(cfg.fsdp),
                "history": history, "config": dict(cfg), "world_size": rt.world,
                "ref": ref_model.state_dict() if ref_model is not None and cfg.ref_update_every else None},
                state_dict=weights)
        if rt.ddp:
            dist.barrier()

    do_eval = bool(cfg.eval_every and (eval_problems or eval_rm_items))
    if do_eval and not (history["accuracy"] or history.get("rm_score")):
        evaluate(0)
    bar = None
    if rt.master and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_steps, initial=step, dynamic_ncols=True, desc="grpo")
    say = (lambda s: bar.write(s)) if bar is not None else log
    while step < cfg.max_steps:
        t_step = time.time()
        lr_now = lr_at(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr_now
        if rt.dev_type == "cuda":
            torch.cuda.reset_peak_memory_stats(rt.device)

        # ---- rollouts
        t0 = time.time()
        groups, info = collect_rollouts(engine, stream, step, cfg, rt, reward_fn, gen, rm)
        if rt.dev_type == "cpu":
            engine.free()  # its prepacked weights go stale at the optimizer step anyway: free them for the update
        time_gen = time.time() - t0
        gen_tokens = rt.all_sum(info["gen_tokens"])
        rows, rec = rollout_rows(groups, cfg)

        # ---- update
        t0 = time.time()
        up = policy_update(policy, ref_model, optimizer, rows, cfg, rt, tok.pad_id, step) if rows else {}
        if sampler is not policy:
            copy_full_params(sampler, policy)  # (all-gathers the shards under FSDP)
        step += 1
        if ref_model is not None and cfg.ref_update_every and step % cfg.ref_update_every == 0:
            copy_full_params(ref_model, policy)
        if rt.dev_type == "cuda":
            torch.cuda.synchronize()
        time_update = time.time() - t0 - up.get("time_logp", 0.0)
        time_step = time.time() - t_step

        rec = {"step": step, **rec, **{k: v for k, v in up.items() if k != "time_logp"}, **info,
               "gen_tokens": int(gen_tokens), "lr": lr_now,
               "time_gen": time_gen, "time_logp": up.get("time_logp", 0.0), "time_update": time_update,
               "time_step": time_step, "gen_tok_s": gen_tokens / max(time_gen, 1e-9), "peak_mem_mb": peak_mem_mb(rt)}
        if peak and rows:
            trained = sum(len(r["prompt"]) + len(r["tokens"]) for r in rows) * cfg.ppo_epochs
            rec["mfu"] = flops_per_tok * trained / max(time_update, 1e-9) / peak
        history["reward"].append((step, rec["reward"]))
        last = step == cfg.max_steps
        if do_eval and (step % cfg.eval_every == 0 or last):
            acc = evaluate(step)
            if acc is not None:
                rec["eval_accuracy"] = acc
            if history.get("rm_score"):
                rec["eval_rm_score"] = history["rm_score"][-1][1]
        rec = {k: (float(f"{v:.5g}") if isinstance(v, float) else v) for k, v in rec.items()}
        metrics.write(rec)
        if bar is not None:
            bar.set_postfix({"reward": f"{rec['reward']:.3f}", "acc": f"{rec.get('accuracy', 0):.3f}",
                             "len": f"{rec.get('completion_len', 0):.0f}", "s/step": f"{time_step:.2f}"},
                            refresh=False)
            bar.update(1)
        elif rt.master:
            print(json.dumps(rec), flush=True)
        if peak and rt.master:
            say(f"step {step}: reward {rec['reward']:.3f} | {rec['gen_tok_s']:.0f} gen tok/s | "
                f"MFU {100 * rec.get('mfu', 0):.1f}%")
        if cfg.sample_every and step % cfg.sample_every == 0 and groups and rt.master:
            g = groups[0]
            say(f"--- step {step} samples for {g['item']['where']} (answer {g['item']['row'].get('answer')!r}):")
            for s in g["samples"][:2]:
                say(f"[reward {s['reward']:.2f}] {s['text']!r}")
        if save_or_stop(step, last, cfg.save_every, cfg.stop_after, checkpoint, log):
            break
    if bar is not None:
        bar.close()
    result = {"step": step, "history": history}
    if step == cfg.max_steps and rt.master:
        rewards = [v for _, v in history["reward"]]  # a 10-step running mean: one step's 16 groups are noisy
        smooth = [(s, sum(rewards[max(0, i - 9):i + 1]) / len(rewards[max(0, i - 9):i + 1]))
                  for i, (s, _) in enumerate(history["reward"])]
        for line in ascii_plot({"accuracy (held-out, greedy)": history["accuracy"],
                                "reward (train, 10-step mean)": smooth}):
            print(line)
        if history["accuracy"]:
            before, after = history["accuracy"][0][1], history["accuracy"][-1][1]
            print(f"held-out accuracy: before {100 * before:.1f}% -> after {100 * after:.1f}%")
            result.update(before=before, after=after)
        if history.get("rm_score"):
            before, after = history["rm_score"][0][1], history["rm_score"][-1][1]
            print(f"held-out reward-model score: before {before:.3f} -> after {after:.3f}")
            result.update(rm_before=before, rm_after=after)
        print(f"checkpoint in {ckpt_path}")
    teardown(rt)
    return result


if __name__ == "__main__":
    main()
    exit_if_torchrun()
