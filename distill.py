"""
Distillation for nanoR1: a strong reasoner's behaviour into a small dense model (DeepSeek-R1's R1-Distill-Qwen
models, which beat running RL on the small model itself). Three ways:

  --mode=sequence  what R1 did: the teacher samples num_samples completions per prompt, R1 stage 3's rejection
                   filters (rejection.rejection_sample: correct, well formed, one language, not degenerate, at most
                   max_per_prompt) keep the good ones, written to out_dir/teacher_samples.jsonl with provenance, and
                   the student is fine-tuned on them by train_sft.py's own loop, in-process (train_sft.main). Works
                   across tokenizers.
  --mode=logit     the student matches the teacher's whole next-token distribution (forward KL, Hinton-style with
                   --kd_temperature, optionally cut to the teacher's --topk words) on the same teacher-generated
                   sequences, or on given SFT rows (--sequences=FILE); losses.chunked_forward_kl, chunked over
                   positions.
  --mode=onpolicy  the student samples completions itself (engine.Engine), the teacher only scores the student's
                   tokens, and the student minimises the per-token reverse KL, log pi_student - log pi_teacher used
                   as a per-token negative advantage (on-policy distillation: Agarwal et al. 2024, "On-policy
                   distillation of language models"; Thinking Machines 2025, "On-policy distillation"). Teacher
                   forward passes only, no teacher generation.

Launch:
    # the embedded default: the shipped GRPO-trained tiny teacher into a smaller shipped student, CPU, minutes
    python distill.py
    python distill.py --mode=logit --topk=8
    python distill.py --mode=onpolicy --init_from=out/distill/ckpt --lr=5e-5 --min_lr=5e-6   # after sequence mode
    # measured on the embedded task (README, "Distillation"): sequence 2.6% -> 52.8% in 4 min 49 s, logit 45.0%
    # real models: R1-Distill-Qwen-1.5B taught by a 7B, students on 8 GPUs, the teacher on each rank's GPU
    torchrun --standalone --nproc_per_node=8 distill.py config/distill_r1_7b_to_qwen2.5_1.5b_math.py
    # continue where the last checkpoint left off (sequence: the teacher samples on disk are reused)
    python distill.py --out_dir=out/distill --resume=1

Teacher and student may differ in size and live on different devices (--teacher_device); the teacher runs in
inference mode and is never updated; logit and on-policy modes need one vocabulary (the same tokenizer; the heads
may be padded to different sizes, only the tokenizer's words are compared) and stop with a clear error otherwise.
Under torchrun every rank holds a student replica and its share of each step's rows (gradients summed with one
all-reduce, every loss divided by the global count), and a teacher of its own. Each run prints
`held-out accuracy: teacher X% | student before Y% -> after Z%` (greedy pass@1 on eval_data).
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import train_sft  # sequence mode runs the SFT loop itself, in-process (the one script another script calls)
from configurator import parse_overrides
from dataloader import (PackStream, collate, load_examples, load_prompt_sources, packed_attention_mask, parse_data_spec,
                        read_rows)
from engine import Engine, sample_seed
from lora import tokenizer_dir
from losses import chunked_forward_kl, completion_logprobs, reverse_kl_loss
from model import Transformer, is_adapter_dir, is_checkpoint_dir
from rejection import rejection_sample, save_samples
from reward import accuracy_reward
from tasks import encode_problem, held_out_accuracy
from tokenizer import Tokenizer
from train_common import (Config, RunLog, exit_if_torchrun, find_checkpoint, import_wandb, lora_from_flags, lr_at,
                          make_optimizer, restore_checkpoint, save_checkpoint, save_or_stop, setup_runtime, start_wandb,
                          sum_gradients, teardown)

# -----------------------------------------------------------------------------
# config (defaults = sequence distillation of the embedded tiny teacher into the tiny student, CPU)
_globals_before_config = set(globals())
mode = "sequence"  # sequence (R1) | logit (forward KL to the teacher's distribution) | onpolicy (reverse KL)
teacher = "data/tiny/teacher"  # HF-layout teacher dir (the GRPO-trained tiny model; its README has the command)
init_from = "data/tiny/student"  # the student: HF-layout dir (a smaller pretrained-only tiny model by default)
data = "data/tiny/train.jsonl"  # prompts (`prompt`/`messages` + `answer` or `tests`) the teacher / student answer
n_prompts = 0  # first n_prompts of data (0: all)
sequences = ""  # logit: distil on these SFT rows (`messages`) instead of teacher samples
eval_data = "data/tiny/test.jsonl"  # held-out problems: greedy pass@1 of teacher and student
eval_n = 500
prompt_template = "chat"  # chat | raw | r1zero, for rows with a bare `prompt`
# teacher sampling (sequence, logit) and the stage-3 filters
num_samples = 4  # K completions per prompt
max_per_prompt = 1
prefer = "shortest"  # shortest | random
temperature = 1.0  # sampling temperature (teacher samples; the student's own samples in onpolicy)
max_new_tokens = 128
gen_batch_size = 64  # prompts per generate call
# student training (sequence: handed to train_sft.py; logit, onpolicy: this script's loop)
epochs = 6.0  # sequence, logit: passes over the kept samples (max_steps > 0 overrides)
max_steps = 0  # onpolicy: 0 -> 200
batch_size = 16  # sequence, logit: packs of max_seq_len per micro-batch per rank
max_seq_len = 512
lr = 1e-3
min_lr = 1e-4
warmup_steps = 10
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# logit
kd_temperature = 1.0  # both distributions are softmax(logits / T); the loss is x T^2
topk = 0  # >0: the teacher's distribution cut to its topk words (renormalised)
kd_chunk = 1024  # positions per chunk (peak logits memory = 2 x kd_chunk x vocab)
# onpolicy
prompts_per_step = 16  # over all ranks
samples_per_prompt = 4  # student completions per prompt
micro_batch_size = 64  # completions per forward/backward
logp_chunk = 1024
# runtime
# LoRA (lora.py) for the student: adapters on its frozen base instead of every weight
lora_rank = 0  # >0: train LoRA adapters of this rank (init_from may also be an adapter dir: trained further)
lora_alpha = 32  # the adapters' scale is lora_alpha / lora_rank
lora_targets = "all-linear"  # q,k,v,o,gate,up,down projections of every block, or a comma list of those names
lora_base = ""  # the base of an adapter given as init_from, where its adapter_config.json names none that exists here
teacher_device = "auto"  # auto: the student's device; or e.g. cuda:1 / cpu
device = "auto"
dtype = "auto"  # training compute: auto (bf16 autocast on cuda, fp32 on cpu) | float32 | bfloat16 | float64
eval_every = 100  # logit, onpolicy: steps between held-out evaluations (one before and one at the end always)
log_every = 10
save_every = 0
out_dir = "out/distill"
resume = 0
stop_after = 0
seed = 1337
progress = 1
wandb_project = ""  # W&B project: every metrics.jsonl line also goes there, from global rank 0 ("": off)
wandb_run = ""  # the W&B run's name ("": W&B picks one)
CONFIG_KEYS = [k for k in globals() if k not in _globals_before_config and not k.startswith("_")]
# -----------------------------------------------------------------------------

MODES = ("sequence", "logit", "onpolicy")


def configure(argv=()):
    cfg = Config(parse_overrides(argv, {k: globals()[k] for k in CONFIG_KEYS}))
    if cfg.mode not in MODES:
        raise SystemExit(f"--mode={cfg.mode}: expected one of {', '.join(MODES)}")
    for key in ("num_samples", "batch_size", "prompts_per_step", "samples_per_prompt", "micro_batch_size",
                "max_new_tokens"):
        if cfg[key] < 1:
            raise SystemExit(f"--{key}={cfg[key]}: must be >= 1")
    if cfg.topk < 0 or cfg.kd_temperature <= 0:
        raise SystemExit("--topk must be >= 0 and --kd_temperature > 0")
    return cfg


def check_same_vocabulary(teacher_tok, student_tok, teacher_dir, student_dir):
    """Logit and on-policy distillation compare the two models' probabilities word by word: refuse two tokenizers
    that are not the same vocabulary, naming both directories and the first difference."""
    tv, sv = teacher_tok._tok.get_vocab(True), student_tok._tok.get_vocab(True)
    if tv != sv:
        diff = next((w for w in sorted(set(tv) | set(sv)) if tv.get(w) != sv.get(w)), None)
        raise SystemExit(f"teacher {teacher_dir} ({len(tv)} tokens) and student {student_dir} ({len(sv)} tokens) "
                         f"have different vocabularies (e.g. {diff!r}: teacher id {tv.get(diff)}, student id "
                         f"{sv.get(diff)}); logit and onpolicy distillation need the same tokenizer "
                         "(--mode=sequence works across tokenizers)")


def load_teacher(cfg, rt):
    """The frozen teacher on --teacher_device (bf16 on CUDA, the student's dtype on the CPU), in eval mode."""
    t_dev = rt.device if cfg.teacher_device == "auto" else torch.device(cfg.teacher_device)
    teacher = Transformer.from_pretrained(cfg.teacher, dtype=torch.bfloat16 if t_dev.type == "cuda" else rt.param_dtype,
                                          device=t_dev).eval()
    return teacher.requires_grad_(False)


# -----------------------------------------------------------------------------
# teacher samples (sequence, logit): R1 stage 3's rejection sampling, reused as is


def teacher_samples(cfg, rt, path):
    """The teacher's filtered samples for the first n_prompts of data, written to `path` (+ .report.json) on rank 0
    and returned; reused as they are when path and its report exist and resume=1."""
    if cfg.resume and os.path.isfile(path) and os.path.isfile(path + ".report.json"):
        rt.log(f"reusing the teacher samples in {path}")
        return [r for _, r in read_rows(path)], json.load(open(path + ".report.json"))
    model, tok = load_teacher(cfg, rt), Tokenizer.from_pretrained(tokenizer_dir(cfg.teacher))
    rows, files = [], []
    for spec_path, _ in parse_data_spec(cfg.data):
        part = [row for _, row in read_rows(spec_path)]
        rows, files = rows + part, files + [spec_path] * len(part)
    rows, files = rows[:cfg.n_prompts or None], files[:cfg.n_prompts or None]
    engine = Engine(model, tok, cuda_graphs=model.lm_head.weight.device.type == "cuda")
    t0 = time.time()
    kept, report = rejection_sample(engine, tok, rows, cfg.num_samples, dict(max_new_tokens=cfg.max_new_tokens,
                                    temperature=cfg.temperature), cfg.seed, cfg.prompt_template, cfg.max_per_prompt,
                                    cfg.prefer, rank=rt.rank, world=rt.world, source=cfg.teacher, row_files=files,
                                    batch_size=cfg.gen_batch_size, progress=bool(cfg.progress))
    if not kept:
        raise SystemExit(f"the teacher {cfg.teacher} kept no sample of {len(rows)} prompts x {cfg.num_samples} "
                         f"(rejected: {report['rejected']}); nothing to distil")
    if rt.master:
        save_samples(path, kept, report)
    rt.log(f"teacher samples: kept {report['kept']} of {report['samples']} ({report['acceptance_rate']:.1%}), mean "
           f"{report['mean_kept_tokens']:.1f} tokens, rejected {({k: v for k, v in report['rejected'].items() if v})}"
           f" ({time.time() - t0:.1f}s) -> {path}")
    if rt.ddp:
        dist.barrier()  # the file is complete before any rank reads it
    return kept, report


def run_sequence(cfg, rt):
    """Teacher samples, then train_sft.py's loop on them (in-process, the same process group) -> whether it ran to
    the end (False: stopped by stop_after)."""
    samples_path = os.path.join(cfg.out_dir, "teacher_samples.jsonl")
    teacher_samples(cfg, rt, samples_path)
    shared = ("init_from", "out_dir", "epochs", "max_steps", "batch_size", "max_seq_len", "lr", "min_lr",
              "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "seed", "device", "dtype", "resume",
              "save_every", "stop_after", "progress", "log_every", "wandb_project", "wandb_run", "lora_rank",
              "lora_alpha", "lora_targets", "lora_base")
    rt.log(f"student: train_sft.main on {samples_path}")
    res = train_sft.main(data=samples_path, eval_every=0, eval_frac=0.0, **{k: cfg[k] for k in shared})
    return res["step"] == res["total_steps"]


# -----------------------------------------------------------------------------
# logit and on-policy distillation: this script's own loop


def logit_kd_loss(student, teacher, batch, teacher_head, cfg):
    """Summed T^2 KL(teacher || student) over the learned positions of a collated SFT batch (targets != -100: the
    assistant tokens), and the number of such positions. The teacher runs in inference mode on its own device; its
    final hidden states at those positions come over to the student's device, with teacher_head (its lm_head
    weight, cut to the shared vocabulary and moved once)."""
    attn = packed_attention_mask(batch["doc_ids"])
    sel = batch["targets"] != -100
    t_dev = next(teacher.parameters()).device
    with torch.inference_mode():
        t_hidden = teacher(batch["input_ids"].to(t_dev), position_ids=batch["position_ids"].to(t_dev),
                           attention_mask=None if attn is None else attn.to(t_dev), return_hidden=True)
        t_hidden = t_hidden[sel.to(t_dev)].to(batch["input_ids"].device)
    hidden = student(batch["input_ids"], position_ids=batch["position_ids"], attention_mask=attn, return_hidden=True)
    V = teacher_head.shape[0]
    loss = chunked_forward_kl(hidden[sel], student.lm_head.weight[:V], t_hidden.clone(), teacher_head, cfg.kd_chunk,
                              cfg.kd_temperature, cfg.topk)
    return loss, int(sel.sum())


def logit_step(student, teacher, teacher_head, stream, cfg, rt, tok):
    """One logit-distillation gradient: this rank's batch_size packs of the step, the loss divided by the step's
    learned positions over all ranks."""
    packs = stream.take(cfg.batch_size * rt.world)[rt.rank * cfg.batch_size:(rt.rank + 1) * cfg.batch_size]
    batch = {k: v.to(rt.device) for k, v in collate(packs, tok.pad_id).items()}
    n = rt.all_sum(int((batch["targets"] != -100).sum()))
    with rt.autocast():
        loss, _ = logit_kd_loss(student, teacher, batch, teacher_head, cfg)
    (loss / max(n, 1.0)).backward()
    return dict(kd_loss=rt.all_sum(loss.item()) / max(n, 1.0), tokens=int(n))


def onpolicy_step(student, teacher, engine, stream, step, cfg, rt, tok):
    """One on-policy step: this rank's prompts (k % world == rank) sampled by the student (engine.sample_seed, as in
    train_grpo), scored token by token by the teacher, one reverse-KL gradient accumulated."""
    items = [pack[0] for pack in stream.take(cfg.prompts_per_step)]
    mine = list(range(rt.rank, len(items), rt.world))
    K = cfg.samples_per_prompt
    t0 = time.time()
    seeds = [sample_seed(cfg.seed, step, k, j, K) for k in mine for j in range(K)]
    with torch.no_grad():
        outs = engine.generate([items[k]["ids"] for k in mine], num_samples=K, seed=seeds,
                               max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature) if mine else []
    engine.free()  # prepacked CPU weights go stale at the optimizer step
    time_gen = time.time() - t0
    pairs = [(items[k]["ids"], c.tokens) for k, group in zip(mine, outs) for c in group]
    acc = [accuracy_reward(c.text, items[k]["row"]["answer"]) for k, group in zip(mine, outs) for c in group
           if "answer" in items[k]["row"]]
    n_tok = rt.all_sum(sum(len(c) for _, c in pairs))
    t_dev = next(teacher.parameters()).device
    kl_sum = 0.0
    for s in range(0, len(pairs), cfg.micro_batch_size):
        part = pairs[s:s + cfg.micro_batch_size]
        with torch.inference_mode(), rt.autocast():
            t_lp = completion_logprobs(teacher, part, tok.pad_id, cfg.logp_chunk, 1.0, t_dev).to(rt.device)
        with rt.autocast():
            s_lp = completion_logprobs(student, part, tok.pad_id, cfg.logp_chunk, 1.0, rt.device)
        mask = torch.zeros_like(s_lp)
        for b, (_, c) in enumerate(part):
            mask[b, :len(c)] = 1
        loss, kl = reverse_kl_loss(s_lp, t_lp.clone(), mask)
        (loss / max(n_tok, 1.0)).backward()
        kl_sum += kl.item()
    kl_sum, n_acc, acc_sum = rt.all_sum([kl_sum, len(acc), sum(acc)])
    return dict(reverse_kl=kl_sum / max(n_tok, 1.0), accuracy=acc_sum / max(n_acc, 1.0),
                completion_len=n_tok / max(len(items) * K, 1), time_gen=time_gen)


def training_stream(cfg, rt, tok):
    """-> (the stream of steps' inputs, the number of steps): packs of teacher samples (or --sequences) for logit,
    prompts for onpolicy."""
    try:
        if cfg.mode == "logit":
            path = cfg.sequences or os.path.join(cfg.out_dir, "teacher_samples.jsonl")
            if not cfg.sequences:
                teacher_samples(cfg, rt, path)
            sources, _ = load_examples([path], tok, "sft", cfg.max_seq_len, log=rt.log, rank=rt.rank, world=rt.world)
            stream = PackStream(sources, None, cfg.max_seq_len, cfg.seed, True)
            per_step = cfg.batch_size * rt.world
            total = cfg.max_steps or max(1, int(cfg.epochs * len(stream.packs_in_epoch(0)) / per_step + 0.999))
            rt.log(f"logit distillation: {len(sources[0])} sequences from {path}, {total} steps of {per_step} packs, "
                   f"T={cfg.kd_temperature}, topk={cfg.topk or 'all'}")
            return stream, total
        sources, _, _ = load_prompt_sources(cfg.data, tok, cfg.prompt_template, log=lambda *a: None, rm_rows=True)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    items = [it for src in sources for it in src][:cfg.n_prompts or None]
    total = cfg.max_steps or 200
    rt.log(f"on-policy distillation: {len(items)} prompts, {total} steps of {cfg.prompts_per_step} prompts x "
           f"{cfg.samples_per_prompt} student samples")
    return PackStream([items], None, 0, cfg.seed, do_pack=False), total


def run_trainer(cfg, rt, tok, eval_problems, history):
    """The logit / onpolicy loop: -> whether it ran to the end (False: stopped by stop_after)."""
    ckpt_path, resume_from = find_checkpoint(cfg.out_dir, cfg.resume, rt.log)
    teacher = load_teacher(cfg, rt)
    init = resume_from or cfg.init_from
    if cfg.lora_rank or is_adapter_dir(init):
        student = lora_from_flags(init, cfg, rt)
    else:
        student = Transformer.from_pretrained(init, dtype=rt.param_dtype, device=rt.device)
    V = min(student.config.vocab_size, teacher.config.vocab_size)  # heads padded past the tokenizer may differ
    if V < tok.vocab_size:
        raise SystemExit(f"a head of {V} words does not cover the tokenizer's {tok.vocab_size}")
    teacher_head = teacher.lm_head.weight[:V].detach().to(rt.device)
    optimizer = make_optimizer(student, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), fused=rt.dev_type == "cuda")
    params = [p for p in student.parameters() if p.requires_grad]
    stream, total = training_stream(cfg, rt, tok)
    step = 0
    if resume_from:
        state = restore_checkpoint(rt, resume_from, student, optimizer)
        step, stream.epoch, stream.pos = state["step"], state["data"]["epoch"], state["data"]["pos"]
        history.update(state["history"])
        rt.log(f"resumed from {resume_from} at step {step}")
    log = RunLog(cfg.out_dir, rt, total, step, step if resume_from else None, cfg.mode, cfg.progress,
                 start_wandb(cfg.wandb_project, cfg.wandb_run, cfg, rt))
    engine = Engine(student, tok, cuda_graphs=False)
    if not history["student"] and eval_problems:
        history["student"].append((0, evaluate_model(student, tok, cfg, rt, eval_problems, step=0)))
    while step < total:
        t0 = time.time()
        lr = lr_at(step, total, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        rec = {"step": step + 1, "lr": lr}
        if cfg.mode == "logit":
            rec.update(logit_step(student, teacher, teacher_head, stream, cfg, rt, tok))
        else:
            rec.update(onpolicy_step(student, teacher, engine, stream, step, cfg, rt, tok))
        if rt.ddp:
            sum_gradients(params)
        rec["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf")))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        rec["time_step"] = time.time() - t0
        last = step == total
        if eval_problems and (last or (cfg.eval_every and step % cfg.eval_every == 0)):
            history["student"].append((step, evaluate_model(student, tok, cfg, rt, eval_problems, step=step)))
            rec["eval_accuracy"] = history["student"][-1][1]
        if step % cfg.log_every == 0 or last or "eval_accuracy" in rec:
            log.write({k: (float(f"{v:.5g}") if isinstance(v, float) else v) for k, v in rec.items()})
        log.tick({k: f"{rec[k]:.4f}" for k in ("kd_loss", "reverse_kl", "accuracy") if k in rec})
        if save_or_stop(step, last, cfg.save_every, cfg.stop_after, lambda: save_checkpoint(
                rt, ckpt_path, student, optimizer, resume_from or cfg.init_from, step=step, data=stream.state(),
                history=history, config=dict(cfg)), rt.log):
            break
    log.close()
    return step == total


# -----------------------------------------------------------------------------


def evaluate_dir(path, cfg, rt, problems):
    model = Transformer.from_pretrained(path, dtype=torch.float32, device=rt.device).eval()
    return evaluate_model(model, Tokenizer.from_pretrained(tokenizer_dir(path, cfg.lora_base)), cfg, rt, problems)


def evaluate_model(model, tok, cfg, rt, problems, step=None):
    """Greedy pass@1 on the held-out problems, over all ranks; logged for a training step."""
    engine = Engine(model, tok, cuda_graphs=False)
    prompts = [encode_problem(tok, row, cfg.prompt_template) for row in problems]
    acc = held_out_accuracy(engine, problems, prompts, dict(max_new_tokens=cfg.max_new_tokens), cfg.seed, rt.rank,
                            rt.world)
    engine.free()
    if step is not None:
        rt.log(f"step {step}: student held-out greedy pass@1 {100 * acc:.1f}%")
    return acc


def main(argv=()):
    cfg = configure(argv)
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    if cfg.wandb_project and rt.master:  # (the run itself starts with the training loop's log)
        import_wandb()
    for what, path in (("--teacher", cfg.teacher), ("--init_from", cfg.init_from)):
        if not is_checkpoint_dir(path):
            raise SystemExit(f"{what}={path}: no config.json (expected an HF-layout checkpoint directory or a LoRA "
                             "adapter's)")
    student_tok = Tokenizer.from_pretrained(tokenizer_dir(cfg.init_from, cfg.lora_base))
    if cfg.mode != "sequence":
        check_same_vocabulary(Tokenizer.from_pretrained(tokenizer_dir(cfg.teacher)), student_tok, cfg.teacher,
                              cfg.init_from)
    eval_problems = [r for _, r in read_rows(cfg.eval_data)][:cfg.eval_n] if cfg.eval_data else []
    t0 = time.time()
    history = {"student": []}
    teacher_acc = before = after = None
    if eval_problems:
        teacher_acc = evaluate_dir(cfg.teacher, cfg, rt, eval_problems)
        before = evaluate_dir(cfg.init_from, cfg, rt, eval_problems) if cfg.mode == "sequence" else None
        rt.log(f"held-out greedy pass@1: teacher {100 * teacher_acc:.1f}%"
               + (f", student {100 * before:.1f}%" if before is not None else ""))
    if cfg.mode == "sequence":
        finished = run_sequence(cfg, rt)
        if finished and eval_problems:
            after = evaluate_dir(os.path.join(cfg.out_dir, "ckpt"), cfg, rt, eval_problems)
    else:
        finished = run_trainer(cfg, rt, student_tok, eval_problems, history)
        if history["student"]:
            before, after = history["student"][0][1], history["student"][-1][1]
    result = dict(teacher=teacher_acc, before=before, after=after, finished=finished, wall_s=time.time() - t0)
    if finished and after is not None and rt.master:
        print(f"held-out accuracy: teacher {100 * teacher_acc:.1f}% | student before {100 * before:.1f}% -> "
              f"after {100 * after:.1f}%  ({cfg.mode}, {time.time() - t0:.0f}s)")
        print(f"checkpoint in {os.path.join(cfg.out_dir, 'ckpt')}")
    teardown(rt)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
    exit_if_torchrun()
