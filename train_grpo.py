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

One step: draw prompts_per_step prompts, sample group_size completions each with engine.Engine (prefill once,
fan out), score them with reward.py (with --reward_model, rows that carry nothing for a rule reward to check are
scored by a RewardModel instead), turn rewards into group-relative advantages, then ppo_epochs passes of
`minibatches` optimizer steps each over the rollout batch, with the clipped surrogate (losses.grpo_loss).

DDP (torchrun): every rank holds the whole policy and samples its share of the step's prompts (prompt k of the step
goes to rank k % world) and scores its own groups (the reward model's too); the scored rollouts are all-gathered
(token ids, a few KB), so every rank sees the same global batch, advantages and minibatch split, and trains on its
share of each minibatch; gradients are summed with one all-reduce per optimizer step and every loss is divided by
the *global* normaliser. Each rollout's sampling seed comes from (seed, step, the prompt's global draw index, sample
index), never from the rank, so `torchrun --nproc_per_node=N` reaches the same parameters as one process with the
same prompts_per_step (up to float summation order: tests/test_grpo.py checks max |dparam| <= 1e-5 after a few fp32
steps; Adam can blow the rounding of a gradient that is ~0 up to an lr-sized step, which Qwen2's k_proj biases on
the slowest RoPE frequencies show, so the test uses a bias-free Qwen3-style model). The gradient is all-reduced by
hand rather than through the DistributedDataParallel wrapper because ranks run different numbers of forward/backward
passes (rollouts with zero advantage are skipped), which the wrapper cannot sync.

FSDP2 (--fsdp=1, for policies whose AdamW state does not fit one GPU): the policy is sharded for the update
(train_common.shard_model) and FSDP2 reduce-scatters the gradients, so the hand all-reduce is skipped. Its forwards
and backwards are collectives, so there every rank runs the same number of micro-batches: a rank with fewer rollouts in
a minibatch runs padding passes on one of them with zero weight (the zero-advantage skip stays: that is where the
counts come apart). Rollouts sample from a separate unsharded copy of the policy (also in fp32 on the CPU), refreshed
after each update by all-gathering the shards into it: the Engine (KV cache, CUDA graphs, prepacked CPU weights)
needs plain tensors at fixed addresses, which an FSDP module only has transiently. A reference model (beta > 0) is
used for inference only and stays unsharded (a LoRA policy's reference is the sharded policy, its adapters off).
Checkpoints are gathered onto rank 0: the same HF-layout files.
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
from torch.nn.utils.rnn import pad_sequence

from configurator import parse_overrides
from dataloader import PackStream, load_prompt_sources
from engine import Engine, sample_seed
from losses import (LOSS_AGGS, ROLLOUT_IS_MODES, completion_logprobs, group_advantages, grpo_loss,
                    loss_normalizer, overlong_penalty, rollout_is_weights)
from lora import adapters_off, tokenizer_dir
from model import Transformer, is_adapter_dir, is_checkpoint_dir
from reward import accuracy_reward, combine_rewards, is_equiv, rule_scored
from tasks import (PROMPT_TEMPLATES, RewardModelScorer, Rollout, held_out_rm_score, maj_at_k, pass_at_1, pass_at_k,
                   sample_problems, score_problems)
from tokenizer import Tokenizer
from tools import TOOL_FORMATS, check_names, tool_use
from train_common import (Config, RunLog, copy_full_params, truncate_jsonl, exit_if_torchrun, find_checkpoint, lr_at,
                          make_optimizer, peak_flops, restore_checkpoint, save_checkpoint, save_or_stop,
                          setup_runtime, shard_model, import_wandb, lora_from_flags, start_wandb, sum_gradients,
                          teardown)

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
eval_samples = 1  # K > 1: at every eval also K samples per held-out problem: sampled pass@1 (mean), pass@K and maj@K
eval_temperature = 1.0  # the temperature of those K samples (greedy pass@1 is always measured too)
prompt_template = "chat"  # chat: the tokenizer's chat template | r1zero: R1-Zero's plain-text template (base models) |
# tir: a plain-text prompt that offers ```python blocks (base models with --tools=python) | raw: the prompt as it is
rewards = "accuracy:1"  # reward.py names with weights; every component is logged on its own
reward_model = ""  # RewardModel dir (R1 stage 4): scores the rows without answer / tests / numbers+target
reward_model_weight = 1.0  # such a row's reward = weight x RM score (logged unweighted as reward/rm)
group_size = 16  # G: completions per prompt
prompts_per_step = 16  # prompts per step over all ranks (x group_size rollouts)
max_steps = 120
ppo_epochs = 1  # mu: passes over each rollout batch
minibatches = 1  # optimizer steps per pass
micro_batch_tokens = 512  # >0: each rank packs its rollouts, longest first, into micro-batches of at most this many
# padded tokens (rows x longest row, prompt included; a longer rollout runs alone), the ranks sharing the step's tokens
# evenly; 0: micro_batch_size rollouts a micro-batch, in order. Memory only: the gradient does not change
micro_batch_size = 64  # rollouts per forward/backward on each rank with micro_batch_tokens=0; the reward model's batch
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
overlong_buffer = 32  # soft: the model's own tokens past max_completion_len - this are penalised linearly (cut: -1)
max_prompt_len = 256  # longer prompts are skipped and counted
max_completion_len = 128  # every token after the prompt, a tool's output included (the model's own: completion_len)
temperature = 1.0
top_p = 1.0
top_k = 0
min_p = 0.0
rollout_is = "auto"  # importance weights for the sampler/trainer mismatch: auto | none | token_truncate | token_mask |
# sequence_truncate | sequence_mask (losses.rollout_is_weights); auto: token_truncate when the rollouts come from
# another distribution by construction (a lower-precision sampler, top-k / top-p / min-p), else none
rollout_is_cap = 2.0  # weights above this are truncated (or masked out: *_mask)
rollout_is_floor = 0.5  # *_mask: weights below this are masked out
ignore_eos = 0  # 1 (benchmarks): every completion runs to max_completion_len
tools = ""  # tools the policy calls while it writes, comma-separated (tools.py: calculator, python); "": none
tool_format = "auto"  # chat: Qwen's <tool_call> turns | code: ```python fences answered by ```output blocks | auto:
# chat under a chat template that has tool calls, else code
max_tool_calls = 4  # calls per completion; a call past this gets an error result
max_tool_output_tokens = 256  # a longer result is cut, with a marker that says so
tool_timeout = 5.0  # seconds per call
tools_in_prompt = 1  # chat format: the prompts list the tools' JSON schemas in the system turn (0: a model that learned
# its tools in SFT without them)
sample_every = 40  # print a few completions every this many steps (0: never)
log_rollouts = -1  # append every completion of every N-th step to out_dir/rollouts.jsonl (-1: N = sample_every;
# 0: never)
# LoRA (lora.py): adapters on a frozen base; the reference (beta > 0) is the base, the adapters switched off (also
# when init_from is an SFT adapter: then the reference is the model before that SFT, as in TRL with PEFT)
lora_rank = 0  # >0: train LoRA adapters of this rank instead of every weight (init_from may also be an adapter dir)
lora_alpha = 32  # the adapters' scale is lora_alpha / lora_rank
lora_targets = "all-linear"  # q,k,v,o,gate,up,down projections of every block, or a comma list of those names
lora_base = ""  # the base of an adapter given as init_from, where its adapter_config.json names none that exists here
logp_chunk = 1024  # positions per chunk of the training log-probs (peak logits memory = logp_chunk x vocab)
grad_checkpointing = 0
fsdp = 0  # 1 (torchrun): FSDP2 shards the policy's parameters, gradients and AdamW state over the ranks
sample_dtype = "auto"  # rollout weights: auto (bf16 copy of the policy on cuda, the policy itself on cpu) | float32
cuda_graphs = 1
dtype = "auto"  # training compute: auto (bf16 autocast on cuda, fp32 on cpu) | float32 | bfloat16 | float64
device = "auto"
out_dir = "out/grpo"
save_every = 0  # 0: only at the end
resume = 0
stop_after = 0  # >0: exit right after step k without the final save, like a crash (resume tests)
seed = 1337
skip_bad_rows = 0
progress = 1
wandb_project = ""  # W&B project: every metrics.jsonl line also goes there, from global rank 0 ("": off)
wandb_run = ""  # the W&B run's name ("": W&B picks one)
CONFIG_KEYS = [k for k in globals() if k not in _globals_before_config and not k.startswith("_")]
# -----------------------------------------------------------------------------

CHOICES = dict(loss_agg=LOSS_AGGS, scale_rewards=("group", "batch", "none"),
               importance_sampling=("token", "sequence"), overlong=("none", "mask", "soft"),
               rollout_is=("auto",) + ROLLOUT_IS_MODES,
               prompt_template=PROMPT_TEMPLATES, sample_dtype=("auto", "float32", "bfloat16"),
               tool_format=("auto",) + TOOL_FORMATS)


def configure(argv=()):
    """Module defaults, then recipe files and --key=value arguments in order; checks the values that parse_overrides
    cannot (choices, ranges, reward names)."""
    cfg = Config(parse_overrides(argv, {k: globals()[k] for k in CONFIG_KEYS}))
    for key, choices in CHOICES.items():
        if cfg[key] not in choices:
            raise SystemExit(f"--{key}={cfg[key]}: expected one of {', '.join(choices)}")
    if cfg.eval_samples < 1:
        raise SystemExit(f"--eval_samples={cfg.eval_samples}: must be >= 1")
    if cfg.group_size < 2:
        raise SystemExit(f"--group_size={cfg.group_size}: GRPO needs at least 2 samples per prompt (advantages are "
                         "relative to the group)")
    for key in ("prompts_per_step", "max_steps", "ppo_epochs", "minibatches", "micro_batch_size",
                "max_completion_len", "max_sampling_rounds", "max_tool_calls", "max_tool_output_tokens"):
        if cfg[key] < 1:
            raise SystemExit(f"--{key}={cfg[key]}: must be >= 1")
    if not cfg.tool_timeout > 0:
        raise SystemExit(f"--tool_timeout={cfg.tool_timeout}: must be > 0 (seconds per call)")
    if cfg.micro_batch_tokens < 0:
        raise SystemExit(f"--micro_batch_tokens={cfg.micro_batch_tokens}: must be >= 0 (0: by micro_batch_size)")
    if not cfg.rollout_is_cap > 0:
        raise SystemExit(f"--rollout_is_cap={cfg.rollout_is_cap}: must be > 0")
    if cfg.overlong == "soft" and not 0 < cfg.overlong_buffer < cfg.max_completion_len:
        raise SystemExit(f"--overlong_buffer={cfg.overlong_buffer}: needs 0 < buffer < max_completion_len")
    try:
        combine_rewards(cfg.rewards)
    except ValueError as e:
        raise SystemExit(f"--rewards={cfg.rewards}: {e}") from None
    try:
        check_names([n for n in cfg.tools.split(",") if n])
    except ValueError as e:
        raise SystemExit(f"--tools={cfg.tools}: {e}") from None
    if cfg.rollout_is == "auto":  # the rollouts differ from pi_old by construction: a bf16 sampler, filtered sampling
        cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        bf16_sampler = cfg.sample_dtype == "bfloat16" or (cfg.sample_dtype == "auto" and cuda)
        off_policy = bf16_sampler or cfg.top_k > 0 or cfg.top_p < 1 or cfg.min_p > 0
        cfg["rollout_is"] = "token_truncate" if off_policy else "none"
    return cfg


# -----------------------------------------------------------------------------
# 1. rollouts and their rewards: one tasks.Rollout per completion, the record evaluation and rejection sampling use


def generate_groups(engine, items, first_draw, step, cfg, rt, reward_fn, sampling, scorer=None):
    """Sample a group for each item and score it: by reward_fn, or with a RewardModelScorer, a row without rule fields
    by the reward model (parts {"rm": score}). tasks.sample_problems splits the items over the ranks (k % world) and
    gathers the groups; the seeds are engine.sample_seed's. -> (the groups in draw order, each a list of Rollouts,
    generated tokens over all ranks)."""
    def judge(k, group):  # every reward reads what the model wrote (text), never a tool's output (transcript)
        row = items[k]["row"]
        rm_scores = scorer([(row, c.text) for c in group]) if scorer is not None and not rule_scored(row) \
            else None
        rollouts = []
        for j, c in enumerate(group):
            if rm_scores is not None:
                total, parts = scorer.weight * rm_scores[j], {"rm": rm_scores[j]}
            else:
                total, parts = reward_fn(c.text, row)
            if cfg.overlong == "soft":
                parts["overlong"] = overlong_penalty(overlong_length(c, cfg), cfg.max_completion_len,
                                                     cfg.overlong_buffer)
                total += parts["overlong"]
            acc = accuracy_reward(c.text, row["answer"]) if "accuracy" not in parts and "answer" in row \
                else parts.get("accuracy")
            rollouts.append(Rollout(first_draw + k, items[k], c, total, parts, acc, sample_index=j))
        return rollouts

    # sample_problems seeds sample j of item k with first_seed + k * G + j, which is sample_seed(seed, step,
    # first_draw + k, j, G): sample_seed is affine in (draw, j), so every sample keeps its global seed
    first_seed = sample_seed(cfg.seed, step, first_draw, 0, cfg.group_size)
    groups = sample_problems(engine, [it["ids"] for it in items], cfg.group_size, sampling, judge, first_seed,
                             batch_size=len(items), rank=rt.rank, world=rt.world)
    return groups, sum(len(r.completion.tokens) for g in groups for r in g)


def collect_rollouts(engine, stream, step, cfg, rt, reward_fn, sampling, scorer=None):
    """One step's groups. Without dynamic sampling: prompts_per_step fresh prompts. With it (DAPO): groups whose
    rewards are all equal are dropped and more prompts are drawn until prompts_per_step groups are kept or
    max_sampling_rounds rounds were run. -> (groups, info)."""
    kept, drawn, dropped, rounds, n_tok = [], 0, 0, 0, 0
    while len(kept) < cfg.prompts_per_step and rounds < cfg.max_sampling_rounds:
        items = [pack[0] for pack in stream.take(cfg.prompts_per_step - len(kept))]
        groups, n = generate_groups(engine, items, drawn, step, cfg, rt, reward_fn, sampling, scorer)
        drawn, rounds, n_tok = drawn + len(items), rounds + 1, n_tok + n
        if not cfg.dynamic_sampling:
            kept = groups
            break
        for g in groups:
            if max(r.reward for r in g) == min(r.reward for r in g):
                dropped += 1
            else:
                kept.append(g)
    return kept, dict(sampling_rounds=rounds, groups_dropped=dropped, prompts_drawn=drawn, gen_tokens=n_tok)


# -----------------------------------------------------------------------------
# 2. advantages: the groups become one flat batch of rollouts


def rollout_batch(groups, cfg):
    """Groups -> (the step's rollouts, one flat list with each one's group-relative advantage and whether it is in
    the loss; the step's rollout metrics)."""
    rollouts = [r for g in groups for r in g]
    rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float64)
    adv = group_advantages(rewards, cfg.group_size, cfg.scale_rewards) if rollouts else rewards
    for r, a in zip(rollouts, adv.tolist()):
        r.advantage = a
        r.in_loss = not (r.completion.finish_reason == "length" and cfg.overlong == "mask")  # DAPO overlong filtering
    return rollouts, rollout_metrics(groups, rollouts, rewards, bool(cfg.tools))


def overlong_length(completion, cfg):
    """The length DAPO's soft overlong penalty charges: what the model wrote (Completion.model_tokens, as
    completion_len counts), not a tool's output (tool_tokens; both count against max_completion_len, which bounds the
    whole sequence); a completion the budget cut (finish_reason "length") did not finish, and is charged the whole
    budget (-1), as in DAPO."""
    return cfg.max_completion_len if completion.finish_reason == "length" else completion.model_tokens


def rollout_metrics(groups, rollouts, rewards, with_tools):
    if not rollouts:
        return {"reward": 0.0}
    lens = [r.completion.model_tokens for r in rollouts]
    rec = {"reward": float(rewards.mean())}  # the mean total, over every sample
    # each component is the mean over the samples it scored (rule parts over the samples of rule-scored rows, rm
    # over those of RM-scored ones), so mixing the two sources does not dilute either
    for name in dict.fromkeys(n for r in rollouts for n in r.parts):
        vals = [r.parts[name] for r in rollouts if name in r.parts]
        rec[f"reward/{name}"] = sum(vals) / len(vals)
    accs = [r.accuracy for r in rollouts if r.accuracy is not None]
    if accs:
        rec["accuracy"] = sum(accs) / len(accs)
    rechecked = [r.rechecks > 0 for r in rollouts]
    rec["recheck_frac"] = sum(rechecked) / len(rollouts)  # completions that go back over a step (tasks.count_rechecks)
    for name, keep in (("accuracy_recheck", True), ("accuracy_no_recheck", False)):
        vals = [r.accuracy for r, c in zip(rollouts, rechecked) if c == keep and r.accuracy is not None]
        if vals:
            rec[name] = sum(vals) / len(vals)
    checks = [c for r in rollouts for c in r.checks]  # the tiny world's checks (zero where none is written)
    rec.update(checks_agree=sum(not c.disagreed for c in checks), checks_disagree=sum(c.disagreed for c in checks),
               checks_change=sum(c.changed for c in checks), checks_fix=sum(c.fixed for c in checks))
    n_flat = sum(max(r.reward for r in g) == min(r.reward for r in g) for g in groups)
    sampled = [lp for r in rollouts for lp, m in zip(r.completion.logprobs, r.completion.loss_mask) if m]
    rec.update(completion_len=sum(lens) / len(lens), completion_len_max=max(lens),
               truncated_frac=sum(r.completion.finish_reason == "length" for r in rollouts) / len(rollouts),
               zero_std_frac=n_flat / len(groups),
               # the mean surprisal of the sampled tokens: a Monte-Carlo estimate of the sampling policy's per-token
               # entropy (exact in expectation with top_p = 1, top_k = 0), free from the sampler
               entropy=-sum(sampled) / max(len(sampled), 1))
    if with_tools:
        rec["tool_tokens"] = sum(r.completion.tool_tokens for r in rollouts) / len(rollouts)
        rec.update(tool_metrics([r.completion for r in rollouts]))
        for name, used in (("reward_tool", True), ("reward_no_tool", False)):  # completions that called a tool or not
            vals = [r.reward for r in rollouts if bool(r.completion.tool_calls) == used]
            if vals:
                rec[name] = sum(vals) / len(vals)
    return rec


def tool_metrics(completions):
    """engine.Completions -> tool_calls (per completion), tool_use (the share that calls at least once),
    tool_error_frac (of the calls), tool_token_frac (of the tokens, the ones tools and template glue wrote)."""
    calls = [call for c in completions for call in c.tool_calls]
    tokens = sum(len(c.loss_mask) for c in completions)
    n = max(len(completions), 1)
    return dict(tool_calls=len(calls) / n, tool_use=sum(bool(c.tool_calls) for c in completions) / n,
                tool_error_frac=sum(call["error"] is not None for call in calls) / max(len(calls), 1),
                tool_token_frac=sum(c.tool_tokens for c in completions) / max(tokens, 1))


# -----------------------------------------------------------------------------
# 3. the update


def policy_update(policy, ref_model, optimizer, rollouts, cfg, rt, pad_id, step):
    """ppo_epochs x minibatches optimizer steps of the clipped surrogate over the step's rollouts (the global list,
    the same on every rank; each rank trains its share of each minibatch). -> the step's stats.

    Rollouts with no token in the loss (overlong="mask"), and those whose advantage is exactly 0 when beta == 0,
    carry no gradient: they are skipped (the normaliser is still computed over the whole minibatch). A minibatch in
    which no rank trained a rollout is no optimizer step at all (AdamW's moments would still move the weights), on
    every rank alike. stats["trained_rollouts"] counts forward/backward passes of rollouts, summed over the
    ppo_epochs x minibatches optimizer steps (the work the update did, which MFU is computed from); "micro_batches"
    the passes, and "pad_frac" the share of the tokens they pushed through the model that were padding."""
    B = len(rollouts)
    lengths = [r.length for r in rollouts]
    needs_old_logprobs = cfg.ppo_epochs * cfg.minibatches > 1
    stats = dict(clip_frac_low=0.0, clip_frac_high=0.0, kl=0.0, tokens=0.0, loss=0.0, trained_rollouts=0,
                 time_logp=0.0, rollout_is_mean=0.0, rollout_is_clipped_frac=0.0, mismatch_kl=0.0, is_tokens=0.0,
                 ratio_max=0.0, logp_mismatch=0.0, rollout_is_max=0.0, grad_norm=0.0, micro_batches=0, real_tokens=0,
                 padded_tokens=0)
    # pi_old: with one optimizer step per batch it is the policy itself (each micro-batch's detached log-probs);
    # when the policy moves within the step, its log-probs before the first move
    old = old_logprobs(policy, rollouts, lengths, cfg, rt, pad_id, stats) if needs_old_logprobs else None
    ref = {}  # log pi_ref per rollout, computed the first time a micro-batch needs it
    active = {i for i in range(B) if any(rollouts[i].loss_mask) and (cfg.beta > 0 or rollouts[i].advantage != 0.0)}
    params = [p for p in policy.parameters() if p.requires_grad]
    rng = np.random.default_rng([cfg.seed, step])
    for epoch in range(cfg.ppo_epochs):
        order = rng.permutation(B) if cfg.minibatches > 1 else np.arange(B)
        for mb in np.array_split(order, cfg.minibatches):
            mb = sorted(int(i) for i in mb)
            lens = [sum(rollouts[i].loss_mask) for i in mb]
            normalizer = loss_normalizer(lens, cfg.loss_agg, cfg.max_completion_len)
            trained = [i for i in mb if i in active]
            shares = rank_shares(trained, lengths, rt.world, cfg)
            for idx, pad in micro_batches(shares, rt.rank, lengths, trained[:1], cfg):
                lp, old_lp, ref_lp = micro_batch_logprobs(policy, ref_model, old, ref, rollouts, idx, cfg, rt, pad_id,
                                                          stats)
                adv = torch.tensor([rollouts[i].advantage for i in idx], device=lp.device, dtype=lp.dtype)
                mask = padded([rollouts[i].loss_mask for i in idx], rt.device)
                # rollouts drawn from another distribution than pi_old: weigh each token by pi_old / pi_sampler
                sampler_lp = padded([rollouts[i].completion.sample_logprobs for i in idx], rt.device, old_lp.dtype)
                is_w, ist = rollout_is_weights(old_lp, sampler_lp, mask, cfg.rollout_is, cfg.rollout_is_cap,
                                               cfg.rollout_is_floor)
                loss, st = grpo_loss(lp, old_lp, ref_lp, adv, mask, cfg.clip_eps_low, cfg.clip_eps_high, cfg.beta,
                                     cfg.loss_agg, cfg.importance_sampling, cfg.max_completion_len,
                                     normalizer=normalizer,
                                     is_weights=None if cfg.rollout_is == "none" else is_w)
                # a padding pass weighs 0; x world under FSDP2, which averages the gradients over ranks where the
                # hand all-reduce of optimizer_step sums them
                (loss * (0.0 if pad else (rt.world if cfg.fsdp else 1))).backward()
                if not pad:
                    for k in ("clip_frac_low", "clip_frac_high", "kl"):  # token sums, divided by the count at the end
                        stats[k] += st[k] * st["tokens"]
                    stats["tokens"] += st["tokens"]
                    stats["loss"] += loss.item()
                    stats["trained_rollouts"] += len(idx)
                    stats["micro_batches"] += 1
                    stats["real_tokens"] += sum(lengths[i] for i in idx)
                    stats["padded_tokens"] += len(idx) * max(lengths[i] for i in idx)
                    stats["ratio_max"] = max(stats["ratio_max"], st["ratio_max"])
                    for k in ("is_mean", "is_clipped_frac"):
                        stats["rollout_" + k] += ist[k] * ist["tokens"]
                    stats["mismatch_kl"] += ist["mismatch_kl"] * ist["tokens"]
                    stats["is_tokens"] += ist["tokens"]
                    stats["rollout_is_max"] = max(stats["rollout_is_max"], ist["is_max"])
            if rt.all_sum(float(any(p.grad is not None for p in params))):
                stats["grad_norm"] = optimizer_step(params, optimizer, cfg, rt)
    stats["loss"] /= cfg.ppo_epochs * cfg.minibatches  # the mean over the step's optimizer steps, not their sum
    return reduce_update_stats(stats, rt)


def padded(lists, device, dtype=torch.float32):
    """Per-token lists of some rollouts (their loss_mask, logprobs, ...) -> [rollouts, longest] in dtype, 0 past each
    one's end."""
    return pad_sequence([torch.tensor(x, dtype=dtype) for x in lists], batch_first=True).to(device)


def rank_shares(idx, lengths, world, cfg):
    """The rollouts idx split over the ranks, the same split on every rank. With micro_batch_tokens each rank gets
    nearly the same number of tokens (longest first, each to the rank with the fewest so far; ties to the lower
    rank), since the slowest rank sets every step's pace; without, rollout k of idx goes to rank k % world."""
    if not cfg.micro_batch_tokens:
        return [idx[r::world] for r in range(world)]
    shares, load = [[] for _ in range(world)], [0] * world
    for i in sorted(idx, key=lambda i: -lengths[i]):
        r = load.index(min(load))
        shares[r].append(i)
        load[r] += lengths[i]
    return shares


def split_micro_batches(idx, lengths, cfg):
    """One rank's rollouts -> its micro-batches. With micro_batch_tokens: longest first, each micro-batch filled while
    its padded size (rows x its longest row, the first) stays within the budget; a longer rollout runs alone. Sorting
    leaves little padding in a micro-batch (right-padded to its longest row, completion_logprobs). Without:
    micro_batch_size rollouts each, in order."""
    if not cfg.micro_batch_tokens:
        return [idx[s:s + cfg.micro_batch_size] for s in range(0, len(idx), cfg.micro_batch_size)]
    batches = []
    for i in sorted(idx, key=lambda i: -lengths[i]):
        if not batches or (len(batches[-1]) + 1) * lengths[batches[-1][0]] > cfg.micro_batch_tokens:
            batches.append([])
        batches[-1].append(i)
    return batches


def micro_batches(shares, rank, lengths, fill, cfg):
    """(rollout indices, is_padding) for each micro-batch this rank runs over its share (rank_shares), as
    split_micro_batches cuts it. Under FSDP every rank runs as many as the rank with the most, since each forward
    all-gathers and each backward reduce-scatters together with the other ranks: a rank out of micro-batches runs
    `fill` with zero weight."""
    mine = split_micro_batches(shares[rank], lengths, cfg)
    n = max(len(split_micro_batches(share, lengths, cfg)) for share in shares) if cfg.fsdp else len(mine)
    for k in range(n):
        yield (mine[k], False) if k < len(mine) else (fill, True)


def batch_logprobs(model, rollouts, idx, cfg, rt, pad_id):
    return completion_logprobs(model, [(rollouts[i].item["ids"], rollouts[i].completion.tokens) for i in idx], pad_id,
                               cfg.logp_chunk, cfg.temperature, rt.device)


def logp_mismatch(lp, rollouts, idx, device):
    """max |log pi_trainer - log pi_sampler| over the tokens the model sampled in the rollouts idx (not a tool's,
    nor past each completion's end): the sampler/trainer mismatch. The update measures it on the rollouts it runs:
    with one optimizer step a batch only those it trains, so a step that trains none logs 0."""
    if not lp.numel():
        return 0.0
    # the Engine's log-probs of the same tokens under the same unfiltered distribution (not sample_logprobs, which
    # are under the top-p/top-k-filtered one the token was drawn from)
    engine_lp = padded([rollouts[i].completion.logprobs for i in idx], device, lp.dtype)
    forced = padded([rollouts[i].completion.loss_mask for i in idx], device) == 0  # a tool's (or past the end)
    return float((lp - engine_lp).masked_fill(forced, 0.0).abs().max())


@torch.no_grad()
def old_logprobs(policy, rollouts, lengths, cfg, rt, pad_id, stats):
    """log pi_old of every rollout before the step's first optimizer step: each rank computes its share (rank_shares),
    packed as the update packs it, and the ranks swap them. -> {rollout index: [its tokens] cpu tensor}."""
    t0 = time.time()
    old, shares = {}, rank_shares(list(range(len(rollouts))), lengths, rt.world, cfg)
    with rt.autocast():
        for idx, pad in micro_batches(shares, rt.rank, lengths, [0], cfg):
            lp = batch_logprobs(policy, rollouts, idx, cfg, rt, pad_id)
            if not pad:
                stats["logp_mismatch"] = max(stats["logp_mismatch"], logp_mismatch(lp, rollouts, idx, rt.device))
                old.update({i: lp[b, :len(rollouts[i].completion.tokens)].cpu() for b, i in enumerate(idx)})
    if cfg.fsdp:  # FSDP2 keeps the root's parameters gathered after a forward, for the backward that follows a
        policy.reshard()  # training one: after no-grad passes free them (.parameters() are shards again)
    if rt.ddp:
        parts = [None] * rt.world
        dist.all_gather_object(parts, old)
        old = {i: v for p in parts for i, v in p.items()}
    stats["time_logp"] += time.time() - t0
    return old


def micro_batch_logprobs(policy, ref_model, old, ref, rollouts, idx, cfg, rt, pad_id, stats):
    """-> (log pi_theta with grad, log pi_old, log pi_ref or None) [len(idx), T] for one micro-batch."""
    with rt.autocast():
        lp = batch_logprobs(policy, rollouts, idx, cfg, rt, pad_id)
    ref_lp = None
    if ref_model is not None:
        t0 = time.time()
        # a LoRA policy sharded by FSDP is its own reference: every rank runs every pass, whatever it has cached
        missing = idx if cfg.fsdp and ref_model is policy else [i for i in idx if i not in ref]
        if missing:
            with torch.no_grad(), rt.autocast(), adapters_off(ref_model):
                r = batch_logprobs(ref_model, rollouts, missing, cfg, rt, pad_id)
            ref.update({i: r[b, :len(rollouts[i].completion.tokens)] for b, i in enumerate(missing)})
        ref_lp = pad_sequence([ref[i] for i in idx], batch_first=True)
        stats["time_logp"] += time.time() - t0
    if old is not None:
        return lp, pad_sequence([old[i].to(lp.device) for i in idx], batch_first=True), ref_lp
    # one optimizer step per rollout batch: pi_old is the current policy (ratio 1, gradient not 0)
    stats["logp_mismatch"] = max(stats["logp_mismatch"], logp_mismatch(lp.detach(), rollouts, idx, rt.device))
    return lp, lp.detach(), ref_lp


def optimizer_step(params, optimizer, cfg, rt):
    """Sum the gradients over ranks (each loss was divided by the global normaliser; under FSDP2 they are
    reduce-scattered already), clip, step. -> the gradient norm before clipping."""
    if rt.ddp and not cfg.fsdp:
        sum_gradients(params)
    norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def reduce_update_stats(stats, rt):
    """This rank's sums over its micro-batches -> the step's stats over all ranks (token means, maxima)."""
    if rt.ddp:
        keys = ["clip_frac_low", "clip_frac_high", "kl", "tokens", "trained_rollouts", "loss", "time_logp",
                "rollout_is_mean", "rollout_is_clipped_frac", "mismatch_kl", "is_tokens", "micro_batches",
                "real_tokens", "padded_tokens"]
        stats.update(zip(keys, rt.all_sum([stats[k] for k in keys])))
        maxima = ["ratio_max", "logp_mismatch", "rollout_is_max"]
        t = torch.tensor([stats[k] for k in maxima], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        stats.update(zip(maxima, t.tolist()))
        stats["time_logp"] /= rt.world
    n, n_is = max(stats.pop("tokens"), 1.0), stats.pop("is_tokens")
    for k in ("clip_frac_low", "clip_frac_high", "kl"):
        stats[k] /= n
    for k in ("rollout_is_mean", "rollout_is_clipped_frac", "mismatch_kl"):  # token means (no token: ratio 1)
        stats[k] = stats[k] / n_is if n_is else float(k == "rollout_is_mean")
    stats["rollout_is_max"] = stats["rollout_is_max"] if n_is else 1.0
    stats["clip_frac"] = stats["clip_frac_low"] + stats["clip_frac_high"]
    stats["trained_rollouts"], stats["micro_batches"] = int(stats["trained_rollouts"]), int(stats["micro_batches"])
    real, pushed = stats.pop("real_tokens"), stats.pop("padded_tokens")
    stats["pad_frac"] = 1 - real / pushed if pushed else 0.0  # of the tokens the update's passes pushed through
    return stats


# -----------------------------------------------------------------------------
# setup, evaluation, logging


def load_prompts(cfg, tok, reward_fn, log, tools=None):
    """-> (the stream of training prompts, held-out problems, held-out reward-model prompts); with tools in the chat
    format every prompt lists their schemas."""
    try:
        load = dict(template=cfg.prompt_template, max_prompt_len=cfg.max_prompt_len, skip_bad_rows=cfg.skip_bad_rows,
                    tools=tools.schemas if tools else None)
        sources, weights, stats = load_prompt_sources(cfg.data, tok, reward_names=list(reward_fn.weights), log=log,
                                                      rm_rows=bool(cfg.reward_model), **load)
        problems, rm_items = [], []
        if cfg.eval_every and cfg.eval_data:
            srcs, _, _ = load_prompt_sources(cfg.eval_data, tok, reward_names=["accuracy"], log=lambda *a: None, **load)
            problems = [it for src in srcs for it in src][:cfg.eval_n]
        if cfg.eval_every and cfg.eval_rm_data:
            if not cfg.reward_model:
                raise ValueError(f"--eval_rm_data={cfg.eval_rm_data}: needs --reward_model=DIR to score it")
            srcs, _, _ = load_prompt_sources(cfg.eval_rm_data, tok, log=lambda *a: None, rm_rows=True, **load)
            rm_items = [it for src in srcs for it in src][:cfg.eval_rm_n]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    to_rm = f"; {stats['rm']} for the reward model" if cfg.reward_model else ""
    log(f"data: {sum(map(len, sources))} prompts from {len(sources)} file(s) ({stats['too_long']} too long, "
        f"{stats['bad']} bad{to_rm}); {len(problems)} held-out problems"
        f"{f', {len(rm_items)} held-out RM prompts' if rm_items else ''}")
    return PackStream(sources, weights, 0, cfg.seed, do_pack=False), problems, rm_items


def load_models(cfg, rt, resume_from):
    """-> (policy, reference model or None, sampler). fp32 master weights (bf16 compute comes from autocast; fp64 under
    --dtype=float64); a frozen reference only when beta > 0. The sampler is the policy itself, or a low-precision
    copy (or under FSDP an unsharded one) refreshed in place after every update: CUDA graphs keep the addresses of
    its tensors. With LoRA the policy is a frozen base in the compute dtype under fp32 adapters, its own reference
    with the adapters switched off (lora.adapters_off) and, but under FSDP, its own sampler."""
    if cfg.lora_rank or is_adapter_dir(resume_from or cfg.init_from):
        if cfg.ref_update_every:
            raise SystemExit("--ref_update_every with LoRA: not supported (the reference of a LoRA policy is its "
                             "base, the adapters switched off)")
        policy = lora_from_flags(resume_from or cfg.init_from, cfg, rt)
        policy.gradient_checkpointing = bool(cfg.grad_checkpointing)
        sampler = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.fsdp else policy  # (unsharded)
        return policy, policy if cfg.beta > 0 else None, sampler
    policy = Transformer.from_pretrained(resume_from or cfg.init_from, dtype=rt.param_dtype, device=rt.device)
    policy.gradient_checkpointing = bool(cfg.grad_checkpointing)
    ref_model = None
    if cfg.beta > 0:
        ref_model = Transformer.from_pretrained(cfg.init_from, dtype=rt.param_dtype, device=rt.device).eval()
        ref_model.requires_grad_(False)
    sample_dtype = {"auto": torch.bfloat16 if rt.dev_type == "cuda" else rt.param_dtype, "float32": torch.float32,
                    "bfloat16": torch.bfloat16}[cfg.sample_dtype]
    sampler = copy.deepcopy(policy).to(sample_dtype).eval() if sample_dtype != rt.param_dtype or cfg.fsdp else policy
    sampler.requires_grad_(sampler is policy)
    return policy, ref_model, sampler


def reference_kind(policy, ref_model):
    if ref_model is None:
        return "none (beta=0)"
    if ref_model is policy:
        return f"the base (LoRA r={policy.lora['r']} adapters switched off)"
    return "yes"


def evaluate(engine, problems, rm_items, scorer, history, at_step, cfg, rt, sampling):
    """Greedy held-out accuracy (and reward-model score), logged and appended to history. -> the metrics measured."""
    out, rows, prompts = {}, [it["row"] for it in problems], [it["ids"] for it in problems]
    fmt = "answer_tag" if cfg.prompt_template == "r1zero" else "strict"
    if problems:
        t0 = time.time()
        greedy, _ = score_problems(engine, rows, prompts, 1, {**sampling, "temperature": 0.0}, cfg.seed, 64, rt.rank,
                                   rt.world, progress=False, format_mode=fmt)
        greedy = [rollouts[0] for rollouts in greedy]
        out.update(eval_accuracy=sum(r.correct for r in greedy) / len(greedy),
                   eval_completion_len=sum(r.completion.model_tokens for r in greedy) / len(greedy),
                   eval_format=sum(r.parts["format"] for r in greedy) / len(greedy),
                   eval_recheck_frac=sum(r.rechecks > 0 for r in greedy) / len(greedy))
        if sampling.get("tools"):
            out.update({"eval_" + k: v for k, v in tool_metrics([r.completion for r in greedy]).items()})
        for key in ("accuracy", "completion_len", "format", "recheck_frac", "tool_use", "tool_error_frac"):
            if "eval_" + key in out:
                name = key if key == "accuracy" else "eval_" + key
                history.setdefault(name, []).append((at_step, out["eval_" + key]))
        tool_use = f", tools used in {100 * out['eval_tool_use']:.1f}%" if "eval_tool_use" in out else ""
        rt.log(f"step {at_step}: held-out greedy pass@1 {100 * out['eval_accuracy']:.1f}% ({len(problems)} problems, "
               f"{time.time() - t0:.1f}s), {out['eval_completion_len']:.1f} tokens, format "
               f"{100 * out['eval_format']:.1f}%{tool_use}")
    if problems and cfg.eval_samples > 1:
        t0, K = time.time(), cfg.eval_samples
        results, _ = score_problems(engine, rows, prompts, K, {**sampling, "temperature": cfg.eval_temperature},
                                    cfg.seed, 64, rt.rank, rt.world, progress=False, format_mode=fmt)
        correct = [[r.correct for r in rollouts] for rollouts in results]
        answers = [[r.pred for r in rollouts] for rollouts in results]
        out.update(eval_pass1=pass_at_1(correct), eval_pass_at_k=pass_at_k(correct),
                   eval_maj_at_k=maj_at_k(correct, answers, is_equiv))
        rt.log(f"step {at_step}: held-out sampled (T={cfg.eval_temperature}) pass@1 {100 * out['eval_pass1']:.1f}%, "
               f"pass@{K} {100 * out['eval_pass_at_k']:.1f}%, maj@{K} {100 * out['eval_maj_at_k']:.1f}% "
               f"({time.time() - t0:.1f}s)")
    if rm_items:
        t0 = time.time()
        score = held_out_rm_score(engine, rm_items, scorer, sampling, cfg.seed, rt.rank, rt.world)
        history.setdefault("rm_score", []).append((at_step, score))
        out["eval_rm_score"] = score
        rt.log(f"step {at_step}: held-out reward-model score {score:.3f} (greedy, {len(rm_items)} prompts, "
               f"{time.time() - t0:.1f}s)")
    return out


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


CHECK_METRICS = ("recheck_frac", "accuracy_recheck", "accuracy_no_recheck", "checks_agree", "checks_disagree",
                 "checks_change", "checks_fix")


def check_report(history, n=10):
    """The lines on self-checks in the sampled rollouts (R1-Zero's 'aha', DeepSeek-R1, arXiv 2501.12948, sec. 2.2.4):
    their share over the first and the last n steps, how often they were right against the others, and what the
    checks did. None if no rollout re-checked."""
    shares = history.get("recheck_frac", [])
    if not any(v for _, v in shares):
        return None
    first, last = shares[0][0] + n, shares[-1][0] - n  # the first n steps: step < first; the last n: step > last

    def percent(key, steps):  # the mean over those steps of the ones that logged it
        vals = [v for s, v in history.get(key, []) if steps(s)]
        return 100 * sum(vals) / len(vals) if vals else float("nan")

    lines = [f"sampled completions that re-check a step: first {n} steps "
             f"{percent('recheck_frac', lambda s: s < first):.1f}% -> last {n} steps "
             f"{percent('recheck_frac', lambda s: s > last):.1f}%; over the last {n} steps right "
             f"{percent('accuracy_recheck', lambda s: s > last):.1f}% of the time against "
             f"{percent('accuracy_no_recheck', lambda s: s > last):.1f}% for the others"]
    total = {key: sum(v for _, v in history.get(f"checks_{key}", [])) for key in ("agree", "disagree", "change", "fix")}
    if total["agree"] + total["disagree"]:
        lines.append(f"checks over the run: {total['agree']} agreed with the step as written, {total['disagree']} "
                     f"disagreed, {total['change']} of those changed the step ({total['fix']} fixing a slip)")
    return lines


def final_report(history, ckpt_path):
    """The run's last lines: a plot of held-out accuracy and train reward, and the before -> after figures."""
    rewards = [v for _, v in history["reward"]]  # a 10-step running mean: one step's 16 groups are noisy
    smooth = [(s, sum(rewards[max(0, i - 9):i + 1]) / len(rewards[max(0, i - 9):i + 1]))
              for i, (s, _) in enumerate(history["reward"])]
    print("\n".join(ascii_plot({"accuracy (held-out, greedy)": history["accuracy"],
                                "reward (train, 10-step mean)": smooth})))
    result = {}
    if history["accuracy"]:
        before, after = history["accuracy"][0][1], history["accuracy"][-1][1]
        print(f"held-out accuracy: before {100 * before:.1f}% -> after {100 * after:.1f}%")
        result.update(before=before, after=after)
    for key, name, unit in (("eval_tool_use", "tool use", "%"), ("eval_tool_error_frac", "tool calls that failed",
                            "%"), ("eval_completion_len", "completion length", " tokens"), ("eval_format", "format "
                            "compliance", "%"), ("eval_recheck_frac", "completions that re-check a step", "%")):
        if len(history.get(key, [])) > 1:
            scale = 100 if unit == "%" else 1
            before, after = history[key][0][1] * scale, history[key][-1][1] * scale
            print(f"held-out {name} (greedy): before {before:.1f}{unit} -> after {after:.1f}{unit}")
    for line in check_report(history) or []:
        print(line)
    if history.get("rm_score"):
        before, after = history["rm_score"][0][1], history["rm_score"][-1][1]
        print(f"held-out reward-model score: before {before:.3f} -> after {after:.3f}")
        result.update(rm_before=before, rm_after=after)
    print(f"checkpoint in {ckpt_path}")
    return result


def peak_mem_mb(rt):
    if rt.dev_type == "cuda":
        return torch.cuda.max_memory_allocated(rt.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# -----------------------------------------------------------------------------


def main(argv=()):
    cfg = configure(argv)
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    if cfg.wandb_project and rt.master:
        import_wandb()
    ckpt_path, resume_from = find_checkpoint(cfg.out_dir, cfg.resume, rt.log)
    if not is_checkpoint_dir(cfg.init_from):
        raise SystemExit(f"--init_from={cfg.init_from}: no config.json (expected an HF-layout checkpoint directory "
                         "or a LoRA adapter's)")
    tok_dir = tokenizer_dir(resume_from or cfg.init_from, cfg.lora_base)
    tok = Tokenizer.from_pretrained(tok_dir)
    reward_fn = combine_rewards(cfg.rewards)
    try:
        tools = tool_use(tok, cfg.tools, cfg.tool_format, cfg.prompt_template, cfg.max_tool_calls,
                         cfg.max_tool_output_tokens, cfg.tool_timeout, bool(cfg.tools_in_prompt))
    except ValueError as e:  # e.g. the chat format under a template without tool calls
        raise SystemExit(f"--tools={cfg.tools} --tool_format={cfg.tool_format}: {e}") from None
    stream, eval_problems, eval_rm_items = load_prompts(cfg, tok, reward_fn, rt.log, tools)
    policy, ref_model, sampler = load_models(cfg, rt, resume_from)
    scorer = None
    if cfg.reward_model:  # frozen, unsharded on every rank (it scores that rank's groups)
        scorer = RewardModelScorer(cfg.reward_model, tok, cfg.reward_model_weight, rt.device,
                                   torch.bfloat16 if rt.dev_type == "cuda" else rt.param_dtype, cfg.micro_batch_size)
    if cfg.fsdp:
        shard_model(policy)  # in place, after the sampler copy and before the optimizer (it holds the DTensor shards)
    optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), fused=rt.dev_type == "cuda")
    step, history = 0, {"accuracy": [], "reward": [], "rm_score": []}
    if resume_from:
        state = restore_checkpoint(rt, resume_from, policy, optimizer, cfg.fsdp)
        step, history = state["step"], state["history"]
        stream.epoch, stream.pos = state["data"]["epoch"], state["data"]["pos"]
        if ref_model is not None and state.get("ref") is not None:
            ref_model.load_state_dict(state["ref"])
        rt.log(f"resumed from {resume_from} at step {step}")
    engine = Engine(sampler, tok, cuda_graphs=bool(cfg.cuda_graphs) and rt.dev_type == "cuda")
    sampling = dict(max_new_tokens=cfg.max_completion_len, temperature=cfg.temperature, top_p=cfg.top_p,
                    top_k=cfg.top_k, min_p=cfg.min_p, ignore_eos=bool(cfg.ignore_eos),
                    stop=["</answer>"] if cfg.prompt_template == "r1zero" else None, tools=tools)
    rm_info = f"; reward model {cfg.reward_model} ({scorer.model.num_params() / 1e6:.2f}M, x{scorer.weight})" \
        if scorer else ""
    rt.log(f"model: {policy.num_params() / 1e6:.2f}M params; device {rt.device}, world {rt.world}, "
           f"{rt.compute} training{', FSDP2-sharded' if cfg.fsdp else ''}, "
           f"{next(sampler.parameters()).dtype} rollouts; reference model: "
           f"{reference_kind(policy, ref_model)}{rm_info}; rollout IS correction: {cfg.rollout_is}")
    if tools:
        rt.log(f"tools: {tools.describe()}")
    log = StepLog(cfg, rt, policy, tok, step, resume_from, start_wandb(cfg.wandb_project, cfg.wandb_run, cfg, rt))
    # a reference that moves (ref_update_every) is saved with the checkpoints; state_dict holds its live tensors
    ref_state = ref_model.state_dict() if ref_model is not None and cfg.ref_update_every else None
    do_eval = bool(cfg.eval_every and (eval_problems or eval_rm_items))
    if do_eval and not (history["accuracy"] or history.get("rm_score")):  # before the first step: metrics line 0
        log.write({"step": 0, **evaluate(engine, eval_problems, eval_rm_items, scorer, history, 0, cfg, rt, sampling)})
    while step < cfg.max_steps:
        t_step = time.time()
        lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        if rt.dev_type == "cuda":
            torch.cuda.reset_peak_memory_stats(rt.device)
        # 1. rollouts: group_size completions of each of prompts_per_step prompts, each scored by the rewards
        t0 = time.time()
        groups, info = collect_rollouts(engine, stream, step, cfg, rt, reward_fn, sampling, scorer)
        if rt.dev_type == "cpu":
            engine.free()  # its prepacked weights go stale at the optimizer step anyway: free them for the update
        time_gen = time.time() - t0
        # 2. advantages: each completion's reward relative to its group's (losses.group_advantages)
        rollouts, rec = rollout_batch(groups, cfg)
        # 3. update: ppo_epochs x minibatches optimizer steps of the clipped surrogate (losses.grpo_loss)
        t0 = time.time()
        up = policy_update(policy, ref_model, optimizer, rollouts, cfg, rt, tok.pad_id, step) if rollouts else {}
        if sampler is not policy:
            copy_full_params(sampler, policy)  # (all-gathers the shards under FSDP)
        step += 1  # from here on `step` counts finished steps (1-based): logs, evals, checkpoints
        if ref_model is not None and cfg.ref_update_every and step % cfg.ref_update_every == 0:
            copy_full_params(ref_model, policy)
        if rt.dev_type == "cuda":
            torch.cuda.synchronize()
        rec = {"step": step, **rec, "time_logp": 0.0, **up, **info, "lr": lr, "time_gen": time_gen,
               "time_update": time.time() - t0 - up.get("time_logp", 0.0), "time_step": time.time() - t_step}

        # ---- log / eval / save
        last = step == cfg.max_steps
        history["reward"].append((step, rec["reward"]))
        for key in CHECK_METRICS:  # for the final report's lines on self-checks
            if key in rec:
                history.setdefault(key, []).append((step, rec[key]))
        if do_eval and (step % cfg.eval_every == 0 or last):
            rec.update(evaluate(engine, eval_problems, eval_rm_items, scorer, history, step, cfg, rt, sampling))
        log.step(rec, rollouts)
        if save_or_stop(step, last, cfg.save_every, cfg.stop_after, lambda: save_checkpoint(
                rt, ckpt_path, policy, optimizer, tok_dir, cfg.fsdp, step=step, data=stream.state(), history=history,
                config=dict(cfg), ref=ref_state), rt.log):
            break
    log.close()
    result = {"step": step, "history": history}
    if step == cfg.max_steps and rt.master:
        result.update(final_report(history, ckpt_path))
    teardown(rt)
    return result


class StepLog(RunLog):
    """Every step: one metrics.jsonl line (the rollout, update and timing metrics), the bar, on GPU an MFU line; every
    sample_every steps two completions of the step's first group; every log_rollouts steps all the step's completions
    to out_dir/rollouts.jsonl, one line each (on resume the file keeps only the steps up to the checkpoint)."""

    def __init__(self, cfg, rt, policy, tok, step, resume_from, wandb_run):
        super().__init__(cfg.out_dir, rt, cfg.max_steps, step, step if resume_from else None, "grpo", cfg.progress,
                         wandb_run)
        self.cfg, self.flops_per_token = cfg, policy.flops_per_token(cfg.max_prompt_len + cfg.max_completion_len)
        self.tok, self.rollouts_every = tok, cfg.sample_every if cfg.log_rollouts < 0 else cfg.log_rollouts
        self.rollouts_path = os.path.join(cfg.out_dir, "rollouts.jsonl")
        if rt.master and self.rollouts_every:
            truncate_jsonl(self.rollouts_path, step if resume_from else None)
        self.peak = peak_flops(torch.cuda.get_device_name(rt.device)) * rt.world if rt.dev_type == "cuda" else None

    def step(self, rec, rollouts):
        cfg, rt, step = self.cfg, self.rt, rec["step"]
        rec["peak_mem_mb"] = peak_mem_mb(rt)
        rec["gen_tok_s"] = rec["gen_tokens"] / max(rec["time_gen"], 1e-9)
        if self.peak and rollouts:
            # the rollouts that ran forward and backward (policy_update skips the ones with no gradient), at the
            # mean rollout length
            mean_len = sum(r.length for r in rollouts) / len(rollouts)
            trained = mean_len * rec["trained_rollouts"]
            rec["mfu"] = self.flops_per_token * trained / max(rec["time_update"], 1e-9) / self.peak
            self.say(f"step {step}: reward {rec['reward']:.3f} | {rec['gen_tok_s']:.0f} gen tok/s | "
                     f"MFU {100 * rec['mfu']:.1f}%")
        self.write({k: (float(f"{v:.5g}") if isinstance(v, float) else v) for k, v in rec.items()})
        self.tick({"reward": f"{rec['reward']:.3f}", "acc": f"{rec.get('accuracy', 0):.3f}",
                   "len": f"{rec.get('completion_len', 0):.0f}", "s/step": f"{rec['time_step']:.2f}"})
        if cfg.sample_every and step % cfg.sample_every == 0 and rollouts and rt.master:
            item = rollouts[0].item
            self.say(f"--- step {step} samples for {item['where']} (answer {item['row'].get('answer')!r}):")
            for r in rollouts[:2]:
                self.say(f"[reward {r.reward:.2f}] {r.completion.transcript!r}")
        if self.rollouts_every and step % self.rollouts_every == 0 and rt.master:
            self.log_rollouts(step, rollouts)

    def log_rollouts(self, step, rollouts):
        with open(self.rollouts_path, "a", encoding="utf-8") as f:
            for r in rollouts:
                f.write(json.dumps({"step": step, **r.record(self.tok)}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
    exit_if_torchrun()
