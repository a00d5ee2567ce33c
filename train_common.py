"""
What the trainers (train_sft.py, train_grpo.py, distill.py) and sample.py share: process/device setup under torchrun
and the torchrun exit, FSDP2 sharding (--fsdp=1), the optimizer and LR schedule, atomic checkpoints with exact-resume
state, the run log (metrics file, its picture, the bar) and MFU's peak FLOP/s table. One function for each; each takes
plain values (not a script's config object).
"""
import ctypes
import json
import math
import os
import random
import shutil
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from lora import lora_model, save_adapter
from model import swap_in_dir
from plot import write_curves


class Config(dict):
    """A script's resolved config: cfg.lr as well as cfg["lr"]."""
    __getattr__ = dict.__getitem__


# -----------------------------------------------------------------------------
# processes and devices


@dataclass
class Runtime:
    ddp: bool
    rank: int
    local_rank: int
    world: int
    device: torch.device
    dev_type: str
    amp_dtype: torch.dtype | None  # bf16 autocast dtype, or None for plain fp32 (fp64)
    owns_group: bool = True  # this setup_runtime created the process group (teardown destroys only its own)
    param_dtype: torch.dtype = torch.float32  # the weights being trained: fp32 masters, fp64 under --dtype=float64

    @property
    def compute(self):
        """The training compute in words, for the run's first lines."""
        return "bf16 autocast" if self.amp_dtype else {torch.float64: "fp64"}.get(self.param_dtype, "fp32")

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.dev_type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    def log(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs, flush=True)

    def all_sum(self, x):
        """Sum of a number (or list of numbers) over ranks, as float64 on the host."""
        t = torch.tensor(x, dtype=torch.float64, device=self.device)
        if self.ddp:
            dist.all_reduce(t)
        return t.item() if t.dim() == 0 else t.tolist()


def setup_runtime(device="auto", dtype="auto", seed=1337):
    """torchrun sets RANK/WORLD_SIZE (one process per device, NCCL on CUDA, gloo on the CPU); plain python is a
    world of 1. dtype auto: bf16 autocast over fp32 master weights on CUDA, fp32 on the CPU; float64: fp64 weights
    and compute, where a change of summation order moves a result by ~1e-16 instead of ~1e-7, so two ways of running
    one update (DDP, micro-batches) can be compared on any CPU (the tests). Seeds every RNG."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    dev_type = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        if dev_type == "cuda":
            torch.cuda.set_device(local_rank)
        owns_group = not dist.is_initialized()  # a script calling another in-process (distill.py -> train_sft.py)
        if owns_group:
            dist.init_process_group(backend="nccl" if dev_type == "cuda" else "gloo")
    else:
        rank, local_rank, world, owns_group = 0, 0, 1, False
    amp = {"auto": torch.bfloat16 if dev_type == "cuda" else None, "float32": None, "bfloat16": torch.bfloat16,
           "float64": None}
    if dtype not in amp:
        raise SystemExit(f"--dtype={dtype}: expected auto, float32, bfloat16 or float64")
    if dev_type == "cpu":
        keep_freed_memory()
    if dev_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return Runtime(ddp, rank, local_rank, world, torch.device(f"cuda:{local_rank}" if dev_type == "cuda" else dev_type),
                   dev_type, amp[dtype], owns_group, torch.float64 if dtype == "float64" else torch.float32)


def keep_freed_memory():
    """Have glibc's malloc keep the memory that PyTorch frees for the next allocation instead of handing it back to
    the system. By default it maps each block above a threshold (128 KiB, raised as such blocks are freed, up to
    32 MiB) from the system and unmaps it when it is freed, and trims the heap's free top: each decode step's
    [rows, vocab] logits and each log-prob chunk is then faulted in again page by page, and which blocks pay that
    depends on what was freed last. A real-vocabulary GRPO step whose update was cut into many micro-batches
    generated ~2x slower than one cut once (bench/grpo.py --budgets). A setting made once covers every allocation,
    where buffers kept for reuse would cover only the ones we write. Blocks of 256 MiB and more (a big micro-batch's
    activations, the update's [chunk, vocab] buffer) still come from the system and go back to it: they are few and
    each serves a lot of compute, while kept in the heap their holes fragment it (a threshold of 2 GiB raised the
    peak RSS of bench/grpo.py's LoRA step from 2.0 to 3.0 GB, and was no faster). The price is that the process keeps
    the peak of its smaller blocks, as PyTorch's CUDA caching allocator does. Left alone where the environment sets
    one of these three settings itself, and where the C library has no mallopt (macOS, Windows). -> whether the
    settings were made."""
    names = ("mmap_threshold", "trim_threshold", "top_pad")
    if any(f"MALLOC_{n.upper()}_" in os.environ or f"glibc.malloc.{n}" in os.environ.get("GLIBC_TUNABLES", "")
           for n in names):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    # a fixed threshold (an older glibc takes at most 32 MiB) and no trimming; the heap grows 512 MiB at a time
    mapped = mallopt(M_MMAP_THRESHOLD, 256 << 20) or mallopt(M_MMAP_THRESHOLD, 32 << 20)
    return bool(mapped and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) and mallopt(M_TOP_PAD, 512 << 20))


def teardown(rt):
    if rt.ddp and rt.owns_group:
        dist.destroy_process_group()


def exit_if_torchrun(rc=0):
    """A script's last call: under torchrun leave with exit status rc without interpreter teardown (gloo's worker
    threads can SIGABRT there even after destroy_process_group, pytorch PR 179291; everything is written by then)."""
    if "RANK" in os.environ:
        sys.stdout.flush(), sys.stderr.flush()
        if "sandbox" in sys.modules:  # its fork server and directory: os._exit runs no atexit handler
            sys.modules["sandbox"].SERVER.stop()
        os._exit(rc or 0)


# -----------------------------------------------------------------------------
# FSDP2 (--fsdp=1): parameters, gradients and AdamW state sharded over the ranks, for models whose optimizer state
# does not fit one device (7B and up). Between forward/backward passes each parameter is a DTensor holding this
# rank's shard; a forward all-gathers one block at a time and a backward reduce-scatters its gradients (averaged
# over ranks, like DDP). Every rank must therefore run the same number of forward and backward passes.

def shard_model(model):
    """Shard each transformer block, then the root (embeddings, final norm, lm_head), in place: the usual FSDP2
    pattern, one all-gather per block. Build the optimizer afterwards, on the DTensor parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise SystemExit("--fsdp=1 shards over the ranks of a torchrun launch (torchrun --nproc_per_node=N ...)")
    # the mesh on the model's device (fully_shard's default is cuda whenever there is one, even for --device=cpu)
    mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@torch.no_grad()
def copy_full_params(dst, src):
    """dst's parameters <- src's (same architecture), all-gathering src's DTensor shards when it is sharded (then a
    collective: every rank calls it). dst is a plain model: a sampler copy or a reference model."""
    from torch.distributed.tensor import DTensor

    for d, s in zip(dst.parameters(), src.parameters()):
        d.copy_(s.full_tensor() if isinstance(s, DTensor) else s)


# -----------------------------------------------------------------------------
# optimizer and schedule


def sum_gradients(params):
    """Sum every parameter's gradient over the ranks, in place (a missing one counts as zeros): for trainers whose
    ranks run different numbers of forward/backward passes, which the DDP wrapper cannot sync, and whose losses are
    each divided by the global count, so the sum is the gradient of the whole step."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    works = [dist.all_reduce(p.grad, async_op=True) for p in params]
    for w in works:
        w.wait()


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.95), fused=False):
    """AdamW with decoupled weight decay on matrices/embeddings only: decaying norm gains or biases towards 0
    just hurts."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=1e-8, fused=fused)


def lr_at(step, total, lr, min_lr, warmup_steps):
    """Linear warmup over warmup_steps, then cosine from lr to min_lr at the last step. step is 0-based."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


# peak dense bf16 FLOP/s per GPU, for MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
              "4090": 165e12, "A10": 125e12}


def peak_flops(device_name):
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), 312e12)


# -----------------------------------------------------------------------------
# checkpoints: HF-layout model + tokenizer + trainer state, swapped in atomically

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "vocab.json", "merges.txt")


def lora_from_flags(path, cfg, rt):
    """lora.lora_model from a script's --lora_* flags: the frozen base in the run's compute dtype (bf16 under autocast:
    no fp32 master copy of weights that never change), the adapters and their AdamW state in its parameter dtype."""
    return lora_model(path, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_base,
                      rt.amp_dtype or rt.param_dtype, rt.param_dtype, rt.device)


def copy_tokenizer_files(src_dir, dst_dir):
    """Those of TOKENIZER_FILES that src_dir has, into dst_dir."""
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))


def save_checkpoint(rt, path, model, optimizer, tok_dir, fsdp=False, **trainer_state):
    """model (HF layout; a LoRA model's adapters alone, in PEFT's layout) + tokenizer files + trainer_state.pt (the
    optimizer, every rank's RNG state and the caller's trainer_state: step, data position, ...), written by rank 0
    and swapped in as one directory, so a crash at any moment leaves either the previous checkpoint or this one, never
    a mix. Every rank calls it: it gathers."""
    rngs = [rng_state()] * rt.world  # every rank's, in rank order: rank r resumes with entry r
    if rt.ddp:
        dist.all_gather_object(rngs, rng_state())
    if fsdp:  # gathered whole onto rank 0's CPU ({} elsewhere); the optimizer state keyed by parameter name, so it does
        # not depend on the world size
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        # a LoRA model's frozen base never changes and is not saved: gather the adapters alone
        full = StateDictOptions(full_state_dict=True, cpu_offload=True,
                                ignore_frozen_params=bool(getattr(model, "lora", None)))
        weights, opt_state = get_model_state_dict(model, options=full), get_optimizer_state_dict(model, optimizer,
                                                                                                 options=full)
    else:
        weights, opt_state = None, optimizer.state_dict()
    if rt.master:
        staging = path + ".staging"
        shutil.rmtree(staging, ignore_errors=True)
        if getattr(model, "lora", None):
            save_adapter(staging, weights if weights is not None else model.state_dict(), model.lora)
        else:
            model.save_pretrained(staging, state_dict=weights)
        copy_tokenizer_files(tok_dir, staging)
        state = {"optimizer": opt_state, "rng": rngs, "fsdp": bool(fsdp), "world_size": rt.world, **trainer_state}
        torch.save(state, os.path.join(staging, "trainer_state.pt"))
        swap_in_dir(staging, path)
    if rt.ddp:
        dist.barrier()


def restore_checkpoint(rt, path, model, optimizer, fsdp=False):
    """The other half of save_checkpoint, for a model already loaded from path's weights (and sharded, under FSDP):
    the optimizer state and this rank's RNG state. -> the trainer state (step, data position, ...)."""
    # our own file, so weights_only=False (it holds numpy/python RNG tuples). mmap under FSDP: every rank reads the
    # file but keeps only its shard of the optimizer state, so the ranks share one copy in the page cache
    state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False, mmap=bool(fsdp))
    if bool(fsdp) != bool(state.get("fsdp", False)):  # the two optimizer layouts differ (index- vs name-keyed)
        raise SystemExit(f"the checkpoint's optimizer state was saved with --fsdp={int(not fsdp)}: resume with that "
                         "flag (or start a new run from the checkpoint with --init_from)")
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    rngs = state["rng"]
    set_rng_state(rngs[rt.rank] if rt.rank < len(rngs) else rngs[0])
    return state


def save_or_stop(step, last, save_every, stop_after, checkpoint, log):
    """End of an optimizer step: checkpoint() every save_every steps and at the last one. Returns True when
    stop_after says to exit now without the final save, as a crash would (what the resume tests simulate)."""
    if (save_every and step % save_every == 0) or last:
        checkpoint()
    if stop_after and step >= stop_after and not last:
        log(f"stopping after step {step} (--stop_after), without a final save")
        return True
    return False


def find_checkpoint(out_dir, resume=True, log=print):
    """-> (out_dir/ckpt, the directory to resume from or None): the checkpoint itself, or ckpt.old when a crash hit
    between the two renames of save_checkpoint; None when resume is off or there is none (then said)."""
    path = os.path.join(out_dir, "ckpt")
    if not resume:
        return path, None
    for p in (path, path + ".old"):
        if os.path.isfile(os.path.join(p, "trainer_state.pt")):
            return path, p
    log(f"--resume=1 but no checkpoint in {path}; starting fresh")
    return path, None


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -----------------------------------------------------------------------------
# the run log


def truncate_jsonl(path, resume_step=None):
    """Start a run's JSONL log: empty, or on resume only its lines up to the checkpoint's step (none shows twice)."""
    kept = []
    if resume_step is not None and os.path.isfile(path):
        kept = [line for line in open(path) if json.loads(line).get("step", 0) <= resume_step]
    with open(path, "w") as f:
        f.writelines(kept)


def import_wandb():
    """The wandb module, imported only for --wandb_project; a missing install stops the run in one line. Each script
    calls it (on rank 0) before it reads anything else, so that the run stops at once."""
    try:
        import wandb
    except ImportError:
        raise SystemExit("--wandb_project needs Weights & Biases: pip install wandb") from None
    return wandb


def start_wandb(project, run_name, config, rt):
    """--wandb_project=NAME: a W&B run, with the run's config, on global rank 0, to which RunLog sends every metrics
    line (and which RunLog.close finishes); None for "" (off) and on the other ranks. Started once the inputs have
    been read, so that a bad flag or file makes no run."""
    if not project or not rt.master:
        return None
    return import_wandb().init(project=project, name=run_name or None, config=dict(config))


class RunLog:
    """A run's log, on rank 0: out_dir/metrics.jsonl (one JSON line per logged step), its picture out_dir/curves.svg
    (plot.py; redrawn at each record with eval metrics and at the end), a tqdm bar (progress=1) or, without one, each
    record printed, and lines printed above the bar (say). wandb_run (start_wandb): each line also goes to W&B, at
    its step."""

    def __init__(self, out_dir, rt, total, step=0, resume_step=None, desc="", progress=True, wandb_run=None):
        self.path, self.rt, self.bar, self.wandb_run = os.path.join(out_dir, "metrics.jsonl"), rt, None, wandb_run
        if rt.master:
            os.makedirs(out_dir, exist_ok=True)
            truncate_jsonl(self.path, resume_step)
            if progress:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=step, dynamic_ncols=True, desc=desc)

    def write(self, rec):
        if self.rt.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.bar is None:
                print(json.dumps(rec), flush=True)
            if any(k.startswith("eval_") for k in rec):
                write_curves(self.path)
            if self.wandb_run is not None:
                self.wandb_run.log(rec, step=rec["step"])

    def say(self, line):
        self.bar.write(line) if self.bar is not None else self.rt.log(line)

    def tick(self, postfix):
        """The end of a step: the bar moves one step and shows postfix {name: text}."""
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.rt.master and os.path.isfile(self.path):
            write_curves(self.path)
        if self.wandb_run is not None:
            self.wandb_run.finish()
