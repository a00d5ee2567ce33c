"""
One GRPO step, end to end: nanoR1's train_grpo.py vs TRL's GRPOTrainer on the same workload, CPU, fp32.
Seconds per step and peak memory of each side, their ratios, and where each side spends its step.

TRL is a benchmark-only tool here, never a nanoR1 dependency: install it into its own virtualenv that
shares the system torch and transformers, and point --trl_python at that interpreter:

    python3 -m venv /tmp/trlvenv --system-site-packages
    /tmp/trlvenv/bin/pip install trl==1.16.0      # measured with trl 1.16.0 (accelerate 1.16.0, datasets 5.2.0);
                                                  # check it keeps the system torch (here 2.13.0+cpu)
    python bench/grpo.py --trl_python=/tmp/trlvenv/bin/python          # full workload below (2-core CPU: TRL
                                                                       # ~100 s/step, so ~6-10 min in all)
    python bench/grpo.py --trl_python=/tmp/trlvenv/bin/python --smoke  # tiny version: checks the script runs
    python bench/grpo.py --lengths=lognormal                           # ours only: the update on ragged rollouts,
                                                                       # token budget vs micro_batch_size=4
    python bench/grpo.py --budgets=0,512,8192 --steps=2 --threads=2    # ours only: the same step cut by each
                                                                       # --micro_batch_tokens (0: one micro-batch)
    python bench/grpo.py --preset=qwen2.5-0.5b --lora_rank=16 --sides=ours,full,trl \
        --trl_python=/tmp/trlvenv/bin/python --prompts=4 --group=4 --micro_batch=4 --threads=2
                                          # LoRA r=16 on all linear layers, Qwen2.5-0.5B's shape: ours against
                                          # ours with full fine-tuning (side 'full') and TRL + PEFT (~15 min)

The workload (identical on both sides): a random Qwen2 (vocab 151936 with the real Qwen2.5 tokenizer from
tests/fixtures/tokenizers/qwen2.5, hidden 256, 4 layers, 4/2 heads, intermediate 512, tied embeddings),
written once with transformers' save_pretrained and loaded by both sides; 8 chat-templated math prompts per
step (each side applies the tokenizer's chat template itself: ours --prompt_template=chat, TRL conversational
prompts), G = 8 completions each of exactly 64 tokens (ours --ignore_eos=1; TRL min_new_tokens=64 and
max_completion_length=64), temperature 1, beta = 0.04 with a frozen reference model, one optimizer step per
rollout batch (ours ppo_epochs=1 minibatches=1; TRL num_iterations=1, and per_device_train_batch_size x
gradient_accumulation_steps = the step's 64 completions, one generation per optimizer step), token-level
loss aggregation (ours --loss_agg=token, TRL loss_type="dapo"), AdamW lr 1e-6 constant, betas (0.9, 0.99),
no weight decay, grad clip 1.0, fp32 (TRL bf16 and gradient checkpointing off). With --lora_rank=R both sides train
LoRA adapters of rank R (alpha --lora_alpha, no dropout) on the seven linear layers of every block (TRL: PEFT's
LoraConfig), and the reference is the policy with its adapters off (no second model) on both. The reward on both
sides is reward.language_consistency_reward of the completion text (ours --rewards=language:1): cheap, and it varies
across random completions, so advantages are not zero.

Each side runs in its own fresh subprocess (TRL's with --trl_python), with --threads torch threads (default:
all cores). Per step: ours from train_grpo's metrics.jsonl (time_step; split time_gen = rollouts + rewards,
time_logp = reference log-probs, time_update = policy forward + backward + optimizer step); TRL from a
trainer callback (on_step_begin -> on_step_end) and timers wrapped around the trainer instance's methods:
_generate (tokenize + model.generate + decode), _calculate_rewards, _get_per_token_logps_and_entropies
under no_grad (reference log-probs) and with grad (policy forward), accelerator.backward, and the rest
(loss, grad clip, optimizer step, bookkeeping). The first --warmup steps are dropped, the median of the
--steps timed steps is reported. Peak memory: the worker process's peak RSS (bench/common.py's
peak_memory_bytes), also shown net of the RSS right after the worker's imports (TRL imports datasets,
pyarrow, pandas, accelerate, which ours does not).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import hardware, peak_memory_bytes  # noqa: E402  (bench/common.py)

TOKENIZER_DIR = os.path.join(ROOT, "tests", "fixtures", "tokenizers", "qwen2.5")
QUESTIONS = [  # (prompt, answer): short math questions; the answer column is carried, the reward ignores it
    ("What is 17 * 23?", "391"),
    ("Compute 144 / 12 + 7.", "19"),
    ("If x + 5 = 12, what is x?", "7"),
    ("What is the sum of the first 10 positive integers?", "55"),
    ("A train travels 60 km in 45 minutes. What is its speed in km/h?", "80"),
    ("What is 2 to the power of 10?", "1024"),
    ("Simplify 3/4 + 1/8.", "7/8"),
    ("How many prime numbers are less than 20?", "8"),
]
SMOKE = dict(hidden=64, inter=128, layers=2, heads=4, kv_heads=2, prompts=2, group=2, tokens=8, steps=1)
PRESETS = {"qwen2.5-0.5b": dict(hidden=896, inter=4864, layers=24, heads=14, kv_heads=2)}  # its config.json's shape


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_worker(python, argv, threads):
    """Run `python argv...` with `threads` OpenMP threads; return the JSON object on its last stdout line."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "WANDB_DISABLED": "true"}
    t0 = time.time()
    proc = subprocess.run([python, *argv], capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        sys.exit(f"worker {python} {argv} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    try:
        out = json.loads(lines[-1])
    except json.JSONDecodeError:
        sys.exit(f"worker {python} {argv}: no JSON on its last line:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out["wall_s"] = time.time() - t0
    return out


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# -----------------------------------------------------------------------------
# workers (one per side, each in a fresh process)


def worker_ours(a):
    import torch

    torch.set_num_threads(a.threads)
    import train_grpo

    from tasks import encode_problem
    from tokenizer import Tokenizer

    rss_imports = rss_mb()
    tok = Tokenizer.from_pretrained(os.path.join(a.work, "ckpt"))
    prompt_lens = [len(encode_problem(tok, json.loads(line), "chat"))
                   for line in open(os.path.join(a.work, "prompts.jsonl"))]
    out_dir = os.path.join(a.work, "ours_out")
    n_steps = a.warmup + a.steps
    flags = [f"--init_from={a.work}/ckpt", f"--data={a.work}/prompts.jsonl", "--eval_every=0",
             "--prompt_template=chat", "--rewards=language:1", f"--prompts_per_step={a.prompts}",
             f"--group_size={a.group}", f"--max_completion_len={a.tokens}", "--ignore_eos=1", "--temperature=1.0",
             "--top_p=1.0", "--top_k=0", "--beta=0.04", "--loss_agg=token", "--scale_rewards=group",
             "--ppo_epochs=1", "--minibatches=1", f"--micro_batch_size={a.micro_batch or a.prompts * a.group}",
             f"--micro_batch_tokens={a.budget}",  # 0: rows per micro-batch, as TRL's per_device_train_batch_size
             "--lr=1e-6", "--min_lr=1e-6", "--warmup_steps=0", "--weight_decay=0.0", "--beta1=0.9", "--beta2=0.99",
             "--grad_clip=1.0", "--clip_eps_low=0.2", "--clip_eps_high=0.2", "--dtype=float32", "--device=cpu",
             "--progress=0", "--sample_every=0", f"--out_dir={out_dir}", f"--seed={a.seed}",
             f"--rollout_is={a.rollout_is}", f"--lora_rank={a.lora_rank}", f"--lora_alpha={a.lora_alpha}",
             "--lora_targets=all-linear",
             # run one step more than needed and stop after n_steps: the end-of-run checkpoint save is skipped
             f"--max_steps={n_steps + 1}", f"--stop_after={n_steps}"]
    t0 = time.time()
    train_grpo.main(flags)
    total = time.time() - t0
    recs = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    assert len(recs) == n_steps, f"expected {n_steps} steps in metrics.jsonl, got {len(recs)}"
    timed = recs[a.warmup:]
    phases = {k: median([r[k] for r in timed]) for k in ("time_gen", "time_logp", "time_update")}
    print(json.dumps(dict(
        impl="ours", step_s=median([r["time_step"] for r in timed]), steps_s=[r["time_step"] for r in recs],
        phases=phases, gen_s=[r["time_gen"] for r in recs], micro_batches=median([r["micro_batches"] for r in timed]),
        completion_len=median([r["completion_len"] for r in timed]),
        rows=a.prompts * a.group, prompt_len=sum(prompt_lens) / len(prompt_lens),
        reward=sum(r["reward"] for r in recs) / len(recs),
        peak_mb=peak_memory_bytes("cpu") / 2**20, rss_imports_mb=rss_imports, total_s=total,
        threads=torch.get_num_threads(), version="nanoR1", lora_rank=a.lora_rank)))


def worker_trl(a):
    import torch

    torch.set_num_threads(a.threads)
    import datasets
    import transformers
    import trl
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from reward import language_consistency_reward

    rss_imports = rss_mb()
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    def language_reward(completions, **kwargs):  # == ours --rewards=language:1 (lang "en")
        return [language_consistency_reward(c[-1]["content"] if isinstance(c, list) else c) for c in completions]

    rows = [json.loads(line) for line in open(os.path.join(a.work, "prompts.jsonl"))]
    train = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                        for r in rows])
    n_rows = a.prompts * a.group
    micro = a.micro_batch or n_rows
    if n_rows % micro:
        raise SystemExit(f"--micro_batch={micro} must divide prompts x group = {n_rows}")
    n_steps = a.warmup + a.steps
    args = GRPOConfig(
        output_dir=os.path.join(a.work, "trl_out"), use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, per_device_train_batch_size=micro, gradient_accumulation_steps=n_rows // micro,
        num_generations=a.group, max_completion_length=a.tokens, generation_kwargs={"min_new_tokens": a.tokens},
        temperature=1.0, top_p=1.0, top_k=0, beta=0.04, num_iterations=1, loss_type="dapo", scale_rewards="group",
        epsilon=0.2, learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.99, max_grad_norm=1.0, max_steps=n_steps, seed=a.seed,
        model_init_kwargs={"dtype": "float32"}, logging_strategy="no", save_strategy="no", report_to="none",
        disable_tqdm=True, log_completions=False, dataloader_num_workers=0)
    tok = AutoTokenizer.from_pretrained(os.path.join(a.work, "ckpt"))
    peft_config = None
    if a.lora_rank:  # the same adapters as ours: all seven linear layers of each block, alpha / r, no dropout
        from peft import LoraConfig
        peft_config = LoraConfig(r=a.lora_rank, lora_alpha=a.lora_alpha, lora_dropout=0.0, bias="none",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"], task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=os.path.join(a.work, "ckpt"), reward_funcs=language_reward, args=args,
                          train_dataset=train, processing_class=tok, peft_config=peft_config)
    # with PEFT there is no reference model: the reference log-probs are the policy's with its adapters disabled
    assert (trainer.ref_model is None) == bool(a.lora_rank)
    assert args.steps_per_generation * trainer.num_iterations == args.gradient_accumulation_steps  # one generation/step

    # ---- phase timers on the trainer instance (each wrapper adds its wall time to the current step's bucket)
    cur = {}
    gen_lens, prompt_lens, rewards = [], [], []

    def timed(name, fn, classify=None):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            key = classify(*args, **kwargs) if classify else name
            cur[key] = cur.get(key, 0.0) + time.perf_counter() - t0
            return out
        return wrapper

    single_turn = trainer._generate_single_turn

    def generate_single_turn(prompt_ids, *args, **kwargs):
        completion_ids, logprobs = single_turn(prompt_ids, *args, **kwargs)
        gen_lens.extend(len(c) for c in completion_ids)
        prompt_lens.extend(len(p) for p in prompt_ids)
        return completion_ids, logprobs

    score = trainer._calculate_rewards

    def calculate_rewards(*args, **kwargs):
        out = score(*args, **kwargs)  # [rows, reward functions]
        rewards.extend(out[:, 0].tolist())
        return out

    trainer._generate_single_turn = generate_single_turn
    trainer._generate = timed("gen", trainer._generate)
    trainer._calculate_rewards = timed("reward", calculate_rewards)
    # called with grad for the policy's training forward, under no_grad for the reference (and for pi_old, which
    # this setup never needs: one generation per optimizer step; under PEFT the reference is the model itself)
    trainer._get_per_token_logps_and_entropies = timed(
        None, trainer._get_per_token_logps_and_entropies,
        classify=lambda model, *args, **kwargs: "policy_fwd" if torch.is_grad_enabled() else
        ("ref_logp" if model is trainer.ref_model or a.lora_rank else "old_logp"))
    trainer.accelerator.backward = timed("backward", trainer.accelerator.backward)

    steps = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            cur.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            dt = time.perf_counter() - self.t0
            steps.append({"step_s": dt, **cur, "other": dt - sum(cur.values())})

    trainer.add_callback(StepTimer())
    t0 = time.time()
    trainer.train()
    total = time.time() - t0
    assert len(steps) == n_steps, f"expected {n_steps} steps, timed {len(steps)}"
    timed_steps = steps[a.warmup:]
    keys = ("gen", "reward", "ref_logp", "policy_fwd", "backward", "other", "old_logp")
    phases = {k: median([s.get(k, 0.0) for s in timed_steps]) for k in keys}
    print(json.dumps(dict(
        impl="trl", step_s=median([s["step_s"] for s in timed_steps]), steps_s=[s["step_s"] for s in steps],
        phases=phases, completion_len=sum(gen_lens) / max(len(gen_lens), 1), rows=len(gen_lens) // n_steps,
        prompt_len=sum(prompt_lens) / max(len(prompt_lens), 1), reward=sum(rewards) / max(len(rewards), 1),
        peak_mb=peak_memory_bytes("cpu") / 2**20, rss_imports_mb=rss_imports, total_s=total,
        threads=torch.get_num_threads(), version=f"trl {trl.__version__}, transformers {transformers.__version__}"
        + (f", peft {__import__('peft').__version__}" if a.lora_rank else ""), lora_rank=a.lora_rank)))


# -----------------------------------------------------------------------------


def lognormal_update(a):
    """--lengths=lognormal: only the update (policy forward + backward + optimizer step), on rollouts whose completion
    lengths are drawn from a lognormal (median --median_len, sigma --sigma, capped at --tokens) after prompts of
    --prompt_len tokens, the ragged batches R1-Zero and DAPO runs train on. The same rollouts go through
    train_grpo.policy_update packed two ways, alternating step by step on one model: --micro_batch_tokens (default:
    the padded size of 4 rollouts at the cap, the same worst-case memory) against micro_batch_size=4 in index order.
    Reports seconds per update (median), pad_frac and micro-batches per update of each, and their ratio."""
    import numpy as np
    import torch

    import train_grpo
    from engine import Completion
    from model import ModelConfig, Transformer
    from train_common import Runtime, keep_freed_memory, make_optimizer

    keep_freed_memory()  # as train_grpo's setup_runtime does on the CPU
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=151936, hidden_size=a.hidden, intermediate_size=a.inter,
                                    num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                    num_key_value_heads=a.kv_heads, dtype="float32")).init_weights()
    opt = make_optimizer(model, 1e-6, 0.0, (0.9, 0.99))
    rt = Runtime(False, 0, 0, 1, torch.device("cpu"), "cpu", None)
    budget = a.micro_batch_tokens or 4 * (a.prompt_len + a.tokens)
    common = [f"--group_size={a.group}", f"--max_completion_len={a.tokens}", "--loss_agg=token", "--beta=0"]
    configs = {f"micro_batch_tokens={budget}": train_grpo.configure(common + [f"--micro_batch_tokens={budget}"]),
               "micro_batch_size=4": train_grpo.configure(common + ["--micro_batch_tokens=0", "--micro_batch_size=4"])}
    rng = np.random.default_rng(a.seed)
    times, stats = {k: [] for k in configs}, {k: [] for k in configs}
    for step in range(a.warmup + a.steps):
        n = a.prompts * a.group
        lens = np.minimum(np.maximum(rng.lognormal(np.log(a.median_len), a.sigma, n).round(), 1), a.tokens).astype(int)
        rollouts = []
        for k, length in enumerate(lens):
            tokens = rng.integers(10, 151000, int(length)).tolist()
            completion = Completion(tokens, "", [0.0] * len(tokens), "stop", 0, [0.0] * len(tokens), [1] * len(tokens))
            item = {"ids": rng.integers(10, 151000, a.prompt_len).tolist(), "row": {}, "where": "bench"}
            rollouts.append(train_grpo.Rollout(k // a.group, item, completion, 0.0, {}, None, float(rng.normal())))
        for name, cfg in (configs.items() if step % 2 else reversed(list(configs.items()))):
            t0 = time.perf_counter()
            st = train_grpo.policy_update(model, None, opt, rollouts, cfg, rt, 0, step)
            if step >= a.warmup:
                times[name].append(time.perf_counter() - t0)
                stats[name].append(st)
    print(f"hardware: {hardware(a.threads)}; torch {torch.__version__}")
    print(f"workload: random Qwen2 (vocab 151936, hidden {a.hidden}, {a.layers} layers), the update only, fp32; "
          f"{a.prompts} x G={a.group} rollouts a step, prompts of {a.prompt_len} tokens, completions lognormal "
          f"(median {a.median_len}, sigma {a.sigma}, cap {a.tokens}); {a.warmup} warmup + {a.steps} timed step(s)")
    for name in configs:
        print(f"{name:28s} update {median(times[name]):7.2f} s | pad_frac "
              f"{median([s['pad_frac'] for s in stats[name]]):.3f} | micro-batches "
              f"{median([s['micro_batches'] for s in stats[name]]):.0f}")
    first, second = (median(times[k]) for k in configs)
    print(f"ratio: the token budget is {second / first:.2f}x as fast as micro_batch_size=4")


def budgets(a):
    """--budgets: ours alone on the fixed-length workload (real vocabulary), once per --micro_batch_tokens value
    in a fresh process; each budget only cuts the update into micro-batches, so beyond the update's own cost the
    step must not depend on it. Generation in particular runs the same rows whatever the last update's cut was."""
    import torch

    values = [int(v) for v in a.budgets.split(",")]
    res = {}
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as work:
        n_params = write_workload(a, work)
        passed = [f"--{k}={v}" for k, v in vars(a).items()
                  if k not in ("impl", "work", "smoke", "sides", "trl_python", "budgets", "budget")]
        for b in values:
            res[b] = run_worker(sys.executable, [os.path.abspath(__file__), "--impl=ours", f"--work={work}",
                                                 f"--budget={b}"] + passed, a.threads)
    print(f"hardware: {hardware(a.threads)}; torch {torch.__version__}")
    print(f"workload: random Qwen2 {n_params / 1e6:.1f}M params (vocab 151936, hidden {a.hidden}, {a.layers} layers), "
          f"{a.prompts} chat prompts x G={a.group} x exactly {a.tokens} tokens, beta 0.04, fp32; {a.warmup} warmup + "
          f"{a.steps} timed step(s), median; each budget in a fresh process")
    print(f"{'--micro_batch_tokens':>22}{'micro-batches':>15}{'step s':>8}{'gen s':>7}{'logp s':>8}{'update s':>10}"
          f"{'step vs first':>15}  generation at each step (s)")
    first = res[values[0]]["step_s"]
    for b, r in res.items():
        ph = r["phases"]
        print(f"{b if b else '0 (one)':>22}{r['micro_batches']:15.0f}{r['step_s']:8.2f}{ph['time_gen']:7.2f}"
              f"{ph['time_logp']:8.2f}{ph['time_update']:10.2f}{r['step_s'] / first:14.2f}x  "
              f"{', '.join(f'{x:.2f}' for x in r['gen_s'])}")


def write_workload(a, work):
    """The random checkpoint (transformers' Qwen2ForCausalLM, save_pretrained) + tokenizer files, and the prompts."""
    import torch
    import transformers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=a.hidden, intermediate_size=a.inter, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, tie_word_embeddings=True,
                      max_position_embeddings=4096, rope_theta=1e6, bos_token_id=151643, eos_token_id=151645,
                      pad_token_id=151643)
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    ckpt = os.path.join(work, "ckpt")
    model.save_pretrained(ckpt)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), ckpt)
    with open(os.path.join(work, "prompts.jsonl"), "w") as f:
        for q, ans in QUESTIONS[:a.prompts]:
            f.write(json.dumps({"prompt": q, "answer": ans}) + "\n")
    return sum(p.numel() for p in model.parameters())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trl_python", default=sys.executable, help="interpreter with trl installed (TRL side only)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per side (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of each side (default all)")
    p.add_argument("--smoke", action="store_true", help=f"tiny workload to check the script runs: {SMOKE}")
    p.add_argument("--preset", default="", choices=("", *PRESETS), help="a real model's shape (random weights), "
                   "over --hidden/--inter/--layers/--heads/--kv_heads")
    p.add_argument("--lora_rank", type=int, default=0, help="LoRA rank on all linear layers, both sides (TRL: PEFT's "
                   "LoraConfig); 0: full fine-tuning. The side 'full' runs ours without LoRA for the ratio")
    p.add_argument("--lora_alpha", type=float, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--inter", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=8, help=f"prompts per step (at most {len(QUESTIONS)})")
    p.add_argument("--group", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--tokens", type=int, default=0, help="completion length (exact; lognormal: the cap); 0: 64, "
                   "lognormal 768")
    p.add_argument("--micro_batch", type=int, default=0, help="rows per forward/backward on both sides (ours "
                   "micro_batch_size, TRL per_device_train_batch_size); 0: all the step's rows at once")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--rollout_is", default="auto", help="ours: train_grpo --rollout_is (token_truncate: the cost of "
                   "the rollout importance-sampling correction; auto is none on this fp32 workload)")
    p.add_argument("--sides", default="ours,trl", help="which sides to run, of ours, trl and full (ours with "
                   "--lora_rank=0, against ours with LoRA)")
    p.add_argument("--lengths", default="fixed", choices=("fixed", "lognormal"),
                   help="lognormal: the update alone on ragged rollouts, token budget vs micro_batch_size=4 (ours)")
    p.add_argument("--median_len", type=int, default=200, help="lognormal: median completion length")
    p.add_argument("--sigma", type=float, default=0.6, help="lognormal: sigma of the log-length")
    p.add_argument("--prompt_len", type=int, default=40, help="lognormal: prompt length")
    p.add_argument("--micro_batch_tokens", type=int, default=0,
                   help="lognormal: the budget (0: 4 x (prompt_len + tokens), micro_batch_size=4's worst case)")
    p.add_argument("--budgets", default="", help="ours only, the fixed workload once per --micro_batch_tokens "
                   "in this comma list (0: one micro-batch of --micro_batch rows, default all), e.g. 0,512,8192")
    p.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)  # internal: ours' --micro_batch_tokens
    p.add_argument("--impl", default="", help=argparse.SUPPRESS)  # internal: run one side in this process
    p.add_argument("--work", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    for k, v in {**PRESETS.get(a.preset, {}), **(SMOKE if a.smoke else {})}.items():
        setattr(a, k, v)
    a.tokens = a.tokens or (768 if a.lengths == "lognormal" else 64)
    if a.impl:
        return {"ours": worker_ours, "trl": worker_trl}[a.impl](a)
    if a.lengths == "lognormal":
        return lognormal_update(a)
    if a.budgets:
        return budgets(a)
    if not 1 <= a.prompts <= len(QUESTIONS):
        raise SystemExit(f"--prompts must be in 1..{len(QUESTIONS)}")

    import torch

    sides = [s for s in a.sides.split(",") if s]
    if "full" in sides and not a.lora_rank:
        raise SystemExit("the side 'full' is ours without LoRA, to compare with --lora_rank=R: set --lora_rank")
    res = {}
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as work:
        n_params = write_workload(a, work)
        passed = [f"--{k}={v}" for k, v in vars(a).items()
                  if k not in ("impl", "work", "smoke", "sides", "trl_python", "budgets", "preset")]
        for side in sides:
            python = a.trl_python if side == "trl" else sys.executable
            impl = ["--impl=ours", "--lora_rank=0"] if side == "full" else [f"--impl={side}"]
            res[side] = run_worker(python, [os.path.abspath(__file__), f"--work={work}"] + passed + impl, a.threads)

    print(f"hardware: {hardware(a.threads)}; torch {torch.__version__}; "
          + "; ".join(f"{s}: {r['version']} ({r['threads']} threads)" for s, r in res.items()))
    lora = f"LoRA r={a.lora_rank} alpha={a.lora_alpha:g} on all linear layers" if a.lora_rank else "full fine-tuning"
    print(f"workload{' (--smoke)' if a.smoke else ''}: random Qwen2 {n_params / 1e6:.1f}M params "
          f"({a.preset + ' shape: ' if a.preset else ''}vocab 151936, hidden {a.hidden}, {a.layers} layers, heads "
          f"{a.heads}/{a.kv_heads}, inter {a.inter}, tied), Qwen2.5 tokenizer + chat template; {a.prompts} prompts x "
          f"G={a.group} x {a.tokens} tokens, T=1, beta 0.04, token-level loss, fp32, {lora}; {a.warmup} warmup + "
          f"{a.steps} timed step(s), median")
    names = {"ours": f"nanoR1 LoRA r{a.lora_rank}" if a.lora_rank else "nanoR1 train_grpo", "full": "nanoR1 full FT",
             "trl": f"TRL+PEFT r{a.lora_rank}" if a.lora_rank else "TRL GRPOTrainer"}
    print(f"{'':20}{'s/step':>9}{'peak RSS MB':>13}{'peak-imports MB':>17}{'rows':>6}{'prompt len':>11}"
          f"{'compl len':>10}{'reward':>8}  all steps (s)")
    for s, r in res.items():
        print(f"{names[s]:20}{r['step_s']:9.2f}{r['peak_mb']:13.0f}{r['peak_mb'] - r['rss_imports_mb']:17.0f}"
              f"{r['rows']:6d}{r['prompt_len']:11.1f}{r['completion_len']:10.1f}{r['reward']:8.3f}  "
              f"{', '.join(f'{x:.2f}' for x in r['steps_s'])}")
    for side in ("ours", "full"):
        if side in res:
            ph = res[side]["phases"]
            print(f"{side + ' split (s):':17}gen+reward {ph['time_gen']:.2f} | ref logp {ph['time_logp']:.2f} | "
                  f"update (policy fwd+bwd+optim) {ph['time_update']:.2f}")
    if "trl" in res:
        ph = res["trl"]["phases"]
        line = (f"TRL split (s):   gen {ph['gen']:.2f} + reward {ph['reward']:.2f} | ref logp {ph['ref_logp']:.2f} | "
                f"policy fwd {ph['policy_fwd']:.2f} + backward {ph['backward']:.2f} + other {ph['other']:.2f} "
                f"(= update {ph['policy_fwd'] + ph['backward'] + ph['other']:.2f})")
        if ph["old_logp"]:
            line += f" | old logp {ph['old_logp']:.2f} (unexpected)"
        print(line)
    if "ours" in res and "full" in res:
        o, f = res["ours"], res["full"]
        print(f"ratios: LoRA / full fine-tuning, step time {o['step_s'] / f['step_s']:.2f}x (target <= 0.85), "
              f"peak memory {o['peak_mb'] / f['peak_mb']:.2f}x (target <= 0.5), "
              f"peak over imports {(o['peak_mb'] - o['rss_imports_mb']) / (f['peak_mb'] - f['rss_imports_mb']):.2f}x")
    if "ours" in res and "trl" in res:
        o, t = res["ours"], res["trl"]
        print(f"ratios: ours speedup (trl s/step / ours s/step) {t['step_s'] / o['step_s']:.2f}x (target >= 3), "
              f"peak memory (ours / trl) {o['peak_mb'] / t['peak_mb']:.2f}x (target <= 0.5), "
              f"peak over imports {(o['peak_mb'] - o['rss_imports_mb']) / (t['peak_mb'] - t['rss_imports_mb']):.2f}x")
    print("worker wall time (s): " + ", ".join(f"{s} {r['wall_s']:.0f}" for s, r in res.items()))


if __name__ == "__main__":
    main()
