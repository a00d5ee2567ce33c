"""
Every measurement of issue 12 on one GPU, one subcommand each; bench/gpu.sh runs each subcommand in its own
process under `timeout` and then `record`s it, so a crash, OOM or timeout costs one JSON line, not the run.

    bash bench/gpu.sh OUTDIR            # the GPU run (<= 8 min on an H200): OUTDIR/results.jsonl + summary.txt
    bash bench/gpu.sh --smoke OUTDIR    # tiny shapes, same code paths, seconds each (tests/test_gpu_bench.py)

Subcommands (all take --name --out --work [--smoke]; the measurement's dict goes to OUT/parts/NAME.json):
    setup        random-weight checkpoints (Qwen2.5-0.5B / 1.5B shapes, bf16, the real Qwen2.5 tokenizer from
                 tests/fixtures) written once into WORK, plus the environment (GPU name, versions, peaks)
    decode       batch-1 decode tokens/s of engine.Engine (CUDA graphs) and its fraction of the HBM roofline
    rollout      batched generation tokens/s, --impl=ours (Engine) or hf (transformers.generate)
    sft          train_sft's step (collate + batch_loss_sum + AdamW, bench/train.py's worker), MFU
    grpo_update  losses.completion_logprobs + grpo_loss + backward + AdamW step, MFU
    grpo_e2e     train_grpo.main for a few steps: time split, peak memory per phase, logp_mismatch
    record       append NAME's JSON line to OUT/results.jsonl (status ok, or failed / timeout with the log tail)
    summary      OUT/summary.txt and a last "summary" line (ratios and targets) from OUT/results.jsonl

Measurements reuse the bench scripts: decode and rollout call bench/sample.py's worker, sft bench/train.py's
worker, grpo_e2e train_grpo.main with bench/grpo.py's prompts; only the GRPO update loop is written here.
Without CUDA everything runs on the CPU (fp32, no CUDA graphs, peak RSS instead of max_memory_allocated),
which is what --smoke does on a machine without a GPU; the JSON line says so in `notes`.
"""
import argparse
import contextlib
import importlib.util
import io
import json
import os
import shutil
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
TOKENIZER_DIR = os.path.join(ROOT, "tests", "fixtures", "tokenizers", "qwen2.5")

# Qwen2.5 shapes (common.QWEN25_SHAPES, copied so `record`/`summary` need not import torch); tied, rope_theta 1e6
SHAPES = {
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2),
}
SMOKE_SHAPES = {  # the real vocabulary (the tokenizer decodes rollouts for the rewards), everything else tiny
    "0.5b": dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "1.5b": dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2),
}

# the workloads: GPU (issue 12) and --smoke
FULL = dict(
    decode=dict(prompt_len=256, new_tokens=512, repeats=3),
    rollout=dict(prompt_len=256, new_tokens=1024, hf_new_tokens=256, temperature=1.0, repeats=1,
                 batch={64: 64, 256: 256}),
    sft=dict(batch={"0.5b": 8, "1.5b": 4}, seq=2048, steps=3),
    grpo_update=dict(batch={"0.5b": 8, "1.5b": 4}, prompt_len=256, seq=2048, steps=3, grad_checkpointing=0),
    grpo_e2e=dict(prompts=4, group=16, completion=1024, steps=3, micro_batch=8, grad_checkpointing=1, beta=0.001,
                  minibatches=2),
)
SMOKE = dict(
    decode=dict(prompt_len=8, new_tokens=6, repeats=1),
    rollout=dict(prompt_len=8, new_tokens=6, hf_new_tokens=4, temperature=1.0, repeats=1, batch={64: 2, 256: 3}),
    sft=dict(batch={"0.5b": 2, "1.5b": 2}, seq=32, steps=1),
    grpo_update=dict(batch={"0.5b": 2, "1.5b": 2}, prompt_len=8, seq=32, steps=1, grad_checkpointing=0),
    grpo_e2e=dict(prompts=2, group=2, completion=8, steps=2, micro_batch=2, grad_checkpointing=1, beta=0.001,
                  minibatches=2),
)

# peak HBM bandwidth by GPU name (first match wins), for the batch-1 roofline
HBM_BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12),
                 ("H800", 3.35e12), ("A100", 2.039e12)]
PEAK_FLOPS = 989e12  # dense bf16, H100 / H200: the MFU denominator
TARGETS = dict(decode_roofline=0.70, rollout_b256_1p5b_tok_s=15000, mfu=0.40, fits_bytes=80e9)
VLLM_H100_TOK_S = 25000  # the reference: vLLM V1, Qwen2-1.5B, H100 (not measured here)


def load_bench(name):
    """bench/NAME.py as module bench_NAME (bench/sample.py would otherwise shadow the repo's sample.py)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def call_worker(fn, ns):
    """Run a bench script's worker (which prints one JSON line) in this process; return its dict."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn(ns)
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def workload(a, kind):
    return (SMOKE if a.smoke else FULL)[kind]


def shapes(a):
    return SMOKE_SHAPES if a.smoke else SHAPES


def ckpt_dir(a, model):
    return os.path.join(a.work, f"ckpt_{model}{'_smoke' if a.smoke else ''}")


def env():
    """Device facts every JSON line carries."""
    import torch

    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name() if cuda else None
    bw = next((v for k, v in HBM_BANDWIDTH if k in gpu), None) if cuda else None
    return dict(device="cuda" if cuda else "cpu", gpu=gpu, hbm_bandwidth=bw)


def peak_mb(device):
    common = load_bench("common")
    return common.peak_memory_bytes(device) / 2**20


def flops_per_token(shape, seq_len):
    import torch

    from model import ModelConfig, Transformer

    with torch.device("meta"):
        return Transformer(ModelConfig(**shape, tie_word_embeddings=True)).flops_per_token(seq_len)


# -----------------------------------------------------------------------------
# measurements


def cmd_setup(a):
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from model import ModelConfig, Transformer

    try:
        hf_version = version("transformers")  # not `import transformers`: seconds of imports for a version string
    except PackageNotFoundError:
        hf_version = None
    e = env()
    made = {}
    for model, shape in shapes(a).items():
        path = ckpt_dir(a, model)
        cfg = ModelConfig(**shape, tie_word_embeddings=True, rope_theta=1e6, dtype="bfloat16")
        t0 = time.time()
        cfg_file = os.path.join(path, "config.json")
        reused = (os.path.isfile(cfg_file) and json.load(open(cfg_file)) == cfg.to_hf()
                  and os.path.isfile(os.path.join(path, "tokenizer_config.json")))  # the last file written
        if not reused:
            torch.manual_seed(0)
            with torch.device(e["device"]):  # random init on the GPU: seconds, not a minute of CPU normal_()
                m = Transformer(cfg).init_weights()
            m.to("cpu", torch.bfloat16).save_pretrained(path)
            del m
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(os.path.join(TOKENIZER_DIR, name), path)
        with torch.device("meta"):
            n_params = Transformer(cfg).num_params()
        made[model] = dict(path=path, n_params=n_params, shape=shape, reused=reused, seconds=time.time() - t0)
    return dict(**e, torch=torch.__version__, cuda=torch.version.cuda, transformers=hf_version,
                python=sys.version.split()[0], cpu_count=os.cpu_count(), peak_flops=PEAK_FLOPS,
                checkpoints=made, smoke=a.smoke)


def sample_ns(a, **kw):
    base = dict(impl="ours", ckpt=ckpt_dir(a, a.model), batch=1, prompt_len=256, min_prompt_len=0, max_new_tokens=64,
                repeats=1, cuda_graphs=1, compile=0, threads=1 if a.smoke else 0, temperature=0.0, hf_cache="dynamic")
    base.update(kw)
    return argparse.Namespace(**base)


def cmd_decode(a):
    w = workload(a, "decode")
    bench_sample = load_bench("sample")
    e = env()
    r = call_worker(bench_sample.worker, sample_ns(a, prompt_len=w["prompt_len"], min_prompt_len=w["prompt_len"],
                                                   max_new_tokens=w["new_tokens"], repeats=w["repeats"]))
    step_bytes = bench_sample.step_bytes(r)
    achieved = step_bytes / r["step_s"]
    frac = achieved / e["hbm_bandwidth"] if e["hbm_bandwidth"] else None
    notes = [] if e["device"] == "cuda" else [
        "cpu: no CUDA graphs (Engine's CPU path, fp32 + oneDNN linears); no HBM roofline (peak bandwidth unknown: "
        "roofline_frac null); peak_mem_mb is the process's peak RSS"]
    return dict(**e, model=a.model, n_params=r["n_params"], batch=1, prompt_len=w["prompt_len"],
                new_tokens=w["new_tokens"], temperature=0.0, dtype_bytes=r["elem"], cuda_graphs=e["device"] == "cuda",
                tok_s=r["tok_s"], decode_tok_s=r["decode_tok_s"], step_ms=1e3 * r["step_s"],
                step_bytes=step_bytes, mean_context=r["context"], achieved_bytes_per_s=achieved,
                roofline_frac=frac, target_roofline_frac=TARGETS["decode_roofline"],
                meets_target=None if frac is None else frac >= TARGETS["decode_roofline"],
                peak_mem_mb=r["peak_bytes"] / 2**20, notes=notes)


def cmd_rollout(a):
    w = workload(a, "rollout")
    bench_sample = load_bench("sample")
    e = env()
    batch = w["batch"][a.batch]
    n = w["hf_new_tokens"] if a.impl == "hf" else w["new_tokens"]
    r = call_worker(bench_sample.worker, sample_ns(
        a, impl=a.impl, batch=batch, prompt_len=w["prompt_len"], min_prompt_len=w["prompt_len"], max_new_tokens=n,
        repeats=w["repeats"], temperature=w["temperature"]))
    notes = []
    if a.impl == "hf" and n != w["new_tokens"]:
        notes.append(f"transformers measured at {n} new tokens instead of {w['new_tokens']}, to fit the time budget "
                     "(a full-length run at batch 256 takes minutes); the shorter context favours it, so the ours/hf "
                     "ratio is a lower bound")
    if e["device"] != "cuda":
        notes.append("cpu: fp32, no CUDA graphs; peak_mem_mb is the process's peak RSS")
    out = dict(**e, impl=a.impl, model=a.model, n_params=r["n_params"], batch=batch, prompt_len=w["prompt_len"],
               new_tokens=n, target_new_tokens=w["new_tokens"], temperature=w["temperature"],
               hf_cache=None if a.impl == "ours" else "dynamic", cuda_graphs=a.impl == "ours" and e["device"] == "cuda",
               tok_s=r["tok_s"], decode_tok_s=r["decode_tok_s"], step_ms=1e3 * r["step_s"],
               peak_mem_mb=r["peak_bytes"] / 2**20, notes=notes)
    if a.impl == "ours" and a.batch == 256 and a.model == "1.5b":
        out.update(target_tok_s=TARGETS["rollout_b256_1p5b_tok_s"],
                   meets_target=r["tok_s"] >= TARGETS["rollout_b256_1p5b_tok_s"] if e["device"] == "cuda" else None,
                   frac_of_vllm_h100=r["tok_s"] / VLLM_H100_TOK_S)
    return out


def train_notes(e):
    return [] if e["device"] == "cuda" else [
        "cpu: fp32 (no bf16 autocast); MFU against the 989 TFLOP/s GPU peak is meaningless here; "
        "peak_mem_mb is the process's peak RSS"]


def cmd_sft(a):
    w = workload(a, "sft")
    bench_train = load_bench("train")
    e = env()
    s = shapes(a)[a.model]
    batch = w["batch"][a.model]
    ns = argparse.Namespace(impl="ours", device=e["device"], vocab=s["vocab_size"], hidden=s["hidden_size"],
                            inter=s["intermediate_size"], layers=s["num_hidden_layers"],
                            heads=s["num_attention_heads"], kv_heads=s["num_key_value_heads"], batch=batch,
                            seq=w["seq"], steps=w["steps"], ce_chunk=1024)
    r = call_worker(bench_train.worker, ns)
    fpt = flops_per_token(s, w["seq"])
    mfu = fpt * r["tokens_per_s"] / PEAK_FLOPS
    return dict(**e, model=a.model, params_M=r["params_M"], batch=batch, seq=w["seq"], steps=w["steps"],
                autocast="bf16" if e["device"] == "cuda" else None, tokens_per_s=r["tokens_per_s"],
                step_s=batch * w["seq"] / r["tokens_per_s"], flops_per_token=fpt, mfu=mfu,
                target_mfu=TARGETS["mfu"], meets_target=mfu >= TARGETS["mfu"] if e["device"] == "cuda" else None,
                loss=r["loss"], peak_mem_mb=r["peak_mb"], notes=train_notes(e))


def cmd_grpo_update(a):
    import torch

    import losses
    from model import Transformer
    from train_common import make_optimizer

    w = workload(a, "grpo_update")
    e = env()
    dev = torch.device(e["device"])
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    model = Transformer.from_pretrained(ckpt_dir(a, a.model), dtype=torch.float32, device=dev)
    model.gradient_checkpointing = bool(w["grad_checkpointing"])
    model.train()
    opt = make_optimizer(model, 1e-6, 0.0, (0.9, 0.99), fused=cuda)
    B, P = w["batch"][a.model], w["prompt_len"]
    C = w["seq"] - P
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = [(torch.randint(10, V, (P,), generator=g).tolist(), torch.randint(10, V, (C,), generator=g).tolist())
            for _ in range(B)]
    adv = torch.tensor([1.0 if i % 2 else -1.0 for i in range(B)], device=dev)
    mask = torch.ones(B, C, device=dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():  # train_grpo.policy_update's micro-batch with one optimizer step per rollout batch (pi_old = pi)
        with amp:
            lp = losses.completion_logprobs(model, rows, 0, 1024, 1.0, dev).float()
        loss, _ = losses.grpo_loss(lp, lp.detach(), None, adv, mask, loss_agg="sequence")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step()  # warmup
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(w["steps"]):
        loss = step()
    sync()
    dt = (time.perf_counter() - t0) / w["steps"]
    tok_s = B * w["seq"] / dt
    fpt = model.flops_per_token(w["seq"])
    mfu = fpt * tok_s / PEAK_FLOPS
    notes = train_notes(e) + ["MFU counts 6N + attention FLOPs on every prompt and completion token, as "
                              "train_grpo's mfu does (the lm_head runs on completion positions only)"]
    return dict(**e, model=a.model, params_M=model.num_params() / 1e6, batch=B, prompt_len=P, completion_len=C,
                seq=w["seq"], steps=w["steps"], grad_checkpointing=w["grad_checkpointing"],
                autocast="bf16" if cuda else None, tokens_per_s=tok_s, step_s=dt, flops_per_token=fpt, mfu=mfu,
                target_mfu=TARGETS["mfu"], meets_target=mfu >= TARGETS["mfu"] if cuda else None, loss=loss,
                peak_mem_mb=peak_mb(dev), notes=notes)


class PhasePeaks:
    """Peak CUDA memory per GRPO phase, by resetting the peak statistics at every phase change (train_grpo.py is
    not edited: its functions are wrapped from outside). Phases: generation (collect_rollouts), logprob (every
    completion_logprobs under no_grad: pi_old and the reference), update (the rest of policy_update)."""

    def __init__(self, cuda):
        self.cuda, self.cur, self.steps = cuda, None, []

    def enter(self, phase):
        import torch

        if self.cuda and self.cur and self.steps:
            rec = self.steps[-1].setdefault(self.cur, dict(allocated_mb=0.0, reserved_mb=0.0))
            rec["allocated_mb"] = max(rec["allocated_mb"], torch.cuda.max_memory_allocated() / 2**20)
            rec["reserved_mb"] = max(rec["reserved_mb"], torch.cuda.max_memory_reserved() / 2**20)
            torch.cuda.reset_peak_memory_stats()
        self.cur = phase

    def install(self, train_grpo):
        import torch

        collect, update = train_grpo.collect_rollouts, train_grpo.policy_update
        logprobs = train_grpo.completion_logprobs

        def collect_rollouts(*args, **kwargs):
            self.enter(None)  # closes the previous step's update phase
            self.steps.append({})
            self.enter("generation")
            return collect(*args, **kwargs)

        def policy_update(*args, **kwargs):
            self.enter("update")
            try:
                return update(*args, **kwargs)
            finally:
                self.enter("update")  # flush: train_grpo resets the peak stats at the next step's start

        def completion_logprobs(*args, **kwargs):
            if torch.is_grad_enabled():
                return logprobs(*args, **kwargs)
            back = self.cur
            self.enter("logprob")
            try:
                return logprobs(*args, **kwargs)
            finally:
                self.enter(back)

        train_grpo.collect_rollouts, train_grpo.policy_update = collect_rollouts, policy_update
        train_grpo.completion_logprobs = completion_logprobs

    def by_phase(self):
        out = {}
        for s in self.steps:
            for ph, rec in s.items():
                o = out.setdefault(ph, dict(allocated_mb=0.0, reserved_mb=0.0))
                o["allocated_mb"] = max(o["allocated_mb"], rec["allocated_mb"])
                o["reserved_mb"] = max(o["reserved_mb"], rec["reserved_mb"])
        return out


def cmd_grpo_e2e(a):
    import train_grpo

    w = workload(a, "grpo_e2e")
    e = env()
    cuda = e["device"] == "cuda"
    bench_grpo = load_bench("grpo")
    run_dir = os.path.join(a.work, f"grpo_e2e{'_smoke' if a.smoke else ''}")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    data = os.path.join(run_dir, "prompts.jsonl")
    with open(data, "w") as f:
        for q, ans in (bench_grpo.QUESTIONS * 4)[:w["prompts"] * (w["steps"] + 1)]:
            f.write(json.dumps({"prompt": q, "answer": ans}) + "\n")
    out_dir = os.path.join(run_dir, "out")
    budget = w["micro_batch"] * (w["completion"] + 128)  # micro_batch rollouts a pass (chat prompts: < 128 tokens)
    flags = [f"--init_from={ckpt_dir(a, a.model)}", f"--data={data}", "--eval_every=0", "--sample_every=0",
             "--progress=0", "--prompt_template=chat", "--rewards=language:1",  # varies across random completions
             f"--prompts_per_step={w['prompts']}", f"--group_size={w['group']}",
             f"--max_completion_len={w['completion']}", "--ignore_eos=1", "--temperature=1.0",
             f"--beta={w['beta']}", f"--minibatches={w['minibatches']}", f"--micro_batch_tokens={budget}",
             f"--grad_checkpointing={w['grad_checkpointing']}", "--lr=1e-6", "--min_lr=1e-6", "--warmup_steps=0",
             f"--device={e['device']}", f"--out_dir={out_dir}",
             # one step more than run, stopped after `steps`: no end-of-run checkpoint (18 GB for 1.5B + AdamW)
             f"--max_steps={w['steps'] + 1}", f"--stop_after={w['steps']}"]
    peaks = PhasePeaks(cuda)
    peaks.install(train_grpo)
    metrics_file = os.path.join(out_dir, "metrics.jsonl")
    partial = os.path.join(a.out, "parts", f"{a.name}.partial.json")

    def write_partial():  # what a timeout leaves behind: `record` attaches it to the failed line
        recs = [json.loads(line) for line in open(metrics_file)] if os.path.isfile(metrics_file) else []
        with open(partial, "w") as f:
            json.dump(dict(steps_done=len(recs), metrics=recs, phase_peaks_by_step=peaks.steps), f)

    collect = train_grpo.collect_rollouts

    def collect_and_save(*args, **kwargs):
        write_partial()
        return collect(*args, **kwargs)

    train_grpo.collect_rollouts = collect_and_save
    t0 = time.time()
    train_grpo.main(flags)
    wall = time.time() - t0
    peaks.enter(None)
    write_partial()
    shutil.copy(metrics_file, os.path.join(a.out, f"{a.name}.metrics.jsonl"))
    recs = [json.loads(line) for line in open(metrics_file)]
    keys = ("time_gen", "time_logp", "time_update", "time_step", "gen_tok_s", "logp_mismatch", "mfu", "completion_len",
            "trained_rollouts", "grad_norm", "reward", "loss")
    steps = [{k: r.get(k) for k in keys} for r in recs]
    last = steps[-1]
    phases = peaks.by_phase()
    peak_reserved = max((p["reserved_mb"] for p in phases.values()), default=None)
    peak_alloc = max((p["allocated_mb"] for p in phases.values()), default=None)
    notes = ["steady = the last step (the first captures the CUDA graph and warms the kernels up); "
             "metrics.jsonl's peak_mem_mb is not a step peak here (the phase wrapper resets the peak statistics)"]
    if not cuda:
        notes.append("cpu: fp32 training and rollouts, no CUDA graphs; no per-phase peaks (RSS cannot be reset): "
                     "peak_rss_mb is the process peak")
    return dict(**e, model=a.model, prompts_per_step=w["prompts"], group_size=w["group"],
                rows_per_step=w["prompts"] * w["group"], completion_len=w["completion"], steps_run=len(recs),
                grad_checkpointing=w["grad_checkpointing"], beta=w["beta"], minibatches=w["minibatches"],
                micro_batch_tokens=budget, flags=flags, wall_s=wall, steps=steps,
                steady=dict(time_gen=last["time_gen"], time_logp=last["time_logp"], time_update=last["time_update"],
                            time_step=last["time_step"], gen_tok_s=last["gen_tok_s"], mfu=last["mfu"]),
                logp_mismatch_max=max(s["logp_mismatch"] or 0.0 for s in steps),
                peak_by_phase_mb=phases if cuda else None, peak_allocated_mb=peak_alloc if cuda else None,
                peak_reserved_mb=peak_reserved if cuda else None,
                peak_rss_mb=None if cuda else peak_mb("cpu"),
                fits_80gb=(peak_reserved * 2**20 < TARGETS["fits_bytes"]) if cuda else None, notes=notes)


# -----------------------------------------------------------------------------
# bookkeeping: one JSON line per measurement, the summary


def cmd_record(a):
    part = os.path.join(a.out, "parts", f"{a.name}.json")
    line = dict(name=a.name, status="ok", rc=a.rc, elapsed_s=round(a.elapsed, 1), timeout_s=a.timeout, smoke=a.smoke)
    if a.rc == 0 and os.path.isfile(part):
        line.update(json.load(open(part)))
    else:
        line["status"] = "timeout" if a.rc in (124, 137) else "failed"
        log = open(a.log, errors="replace").read() if a.log and os.path.isfile(a.log) else ""
        line["error"] = log[-3000:]
        partial = os.path.join(a.out, "parts", f"{a.name}.partial.json")
        if os.path.isfile(partial):
            line["partial"] = json.load(open(partial))
    with open(os.path.join(a.out, "results.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"{a.name}: {line['status']} ({a.elapsed:.0f} s of {a.timeout})", flush=True)


def fmt(x, spec=".0f", none="n/a"):
    return none if x is None else format(x, spec)


def pct(x, spec=".0f"):
    return "n/a" if x is None else format(100 * x, spec) + "%"


def cmd_summary(a):
    path = os.path.join(a.out, "results.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
    rows = [r for r in rows if r["name"] != "summary"]
    by = {r["name"]: r for r in rows}
    ok = {n: r for n, r in by.items() if r["status"] == "ok"}
    s = ok.get("setup", {})
    device = s.get("gpu") or s.get("device", "?")
    lines = [f"nanoR1 GPU bench (issue 12){' --smoke' if a.smoke else ''}: device {device}"
             f", torch {s.get('torch', '?')} (CUDA {s.get('cuda')}), transformers {s.get('transformers', '?')}, "
             f"HBM peak {fmt(s.get('hbm_bandwidth'), '.3g')} B/s, MFU peak {PEAK_FLOPS:.3g} FLOP/s",
             f"{len(ok)}/{len(rows)} measurements ok; total {sum(r['elapsed_s'] for r in rows):.0f} s", ""]
    derived = {}

    def met(flag):
        return "n/a" if flag is None else ("MET" if flag else "MISSED")

    for r in rows:
        n = r["name"]
        if r["status"] != "ok":
            err = r.get("error", "").strip().splitlines()
            lines.append(f"{n}: {r['status'].upper()} (rc {r['rc']}, {r['elapsed_s']} s of {r['timeout_s']}): "
                         f"{err[-1] if err else ''}")
            continue
        if n.startswith("decode"):
            lines.append(f"{n}: {r['decode_tok_s']:.0f} tok/s decode (step {r['step_ms']:.3f} ms, "
                         f"{r['step_bytes'] / 1e9:.2f} GB/step), HBM roofline {pct(r['roofline_frac'])}"
                         f" (target >= 70%: {met(r['meets_target'])})")
            derived[f"{n}.roofline_frac"] = r["roofline_frac"]
        elif n.startswith("rollout"):
            line = (f"{n}: {r['tok_s']:.0f} tok/s end to end, {r['decode_tok_s']:.0f} decode (batch {r['batch']}, "
                    f"{r['prompt_len']} + {r['new_tokens']} tokens, T={r['temperature']}), "
                    f"peak {r['peak_mem_mb']:.0f} MiB")
            if "meets_target" in r:
                line += (f"; target >= 15,000: {met(r['meets_target'])}; {pct(r['frac_of_vllm_h100'])} of "
                         "vLLM V1's ~25K on an H100 (the issue's figure)")
            lines.append(line)
        elif n.startswith(("sft", "grpo_update")):
            lines.append(f"{n}: {r['tokens_per_s']:.0f} tok/s, MFU {100 * r['mfu']:.1f}% (target >= 40%: "
                         f"{met(r['meets_target'])}), batch {r['batch']} x {r['seq']}, peak {r['peak_mem_mb']:.0f} MiB")
            derived[f"{n}.mfu"] = r["mfu"]
        elif n.startswith("grpo_e2e"):
            st = r["steady"]
            ph = r.get("peak_by_phase_mb") or {}
            phs = ", ".join(f"{k} {v['allocated_mb'] / 1024:.1f}/{v['reserved_mb'] / 1024:.1f}" for k, v in ph.items())
            lines.append(f"{n}: {r['rows_per_step']} rows x {r['completion_len']} tokens, "
                         f"step {st['time_step']:.2f} s = "
                         f"gen {st['time_gen']:.2f} + logp {st['time_logp']:.2f} + update {st['time_update']:.2f} "
                         f"({st['gen_tok_s']:.0f} gen tok/s, update MFU {pct(st['mfu'], '.1f')}); "
                         f"logp_mismatch max {r['logp_mismatch_max']:.3g}")
            lines.append(f"    peak GiB allocated/reserved by phase: {phs or 'n/a (cpu)'}; "
                         f"fits in 80 GB: {met(r['fits_80gb'])}")
            derived.update({f"{n}.fits_80gb": r["fits_80gb"], f"{n}.logp_mismatch_max": r["logp_mismatch_max"]})
    for b in (64, 256):
        o, h = ok.get(f"rollout_ours_b{b}_1.5b"), ok.get(f"rollout_hf_b{b}_1.5b")
        if o and h:
            ratio = o["decode_tok_s"] / h["decode_tok_s"]
            derived[f"rollout_b{b}_1.5b.ours_over_hf_decode"] = ratio
            lines.append(f"rollouts batch {b} (1.5B): ours / transformers decode tok/s x{ratio:.2f} "
                         f"(hf at {h['new_tokens']} new tokens, ours at {o['new_tokens']})")
    lines.append("")
    lines.append("figures per measurement: results.jsonl (one JSON line each); logs: logs/NAME.log")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(a.out, "summary.txt"), "w") as f:
        f.write(text)
    with open(path, "a") as f:
        f.write(json.dumps(dict(name="summary", status="ok", smoke=a.smoke, measurements=len(rows),
                                ok=len(ok), derived=derived)) + "\n")
    print(text, end="")
    return 0 if len(ok) == len(rows) else 1


MEASUREMENTS = dict(setup=cmd_setup, decode=cmd_decode, rollout=cmd_rollout, sft=cmd_sft, grpo_update=cmd_grpo_update,
                    grpo_e2e=cmd_grpo_e2e)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=[*MEASUREMENTS, "record", "summary"])
    p.add_argument("--name", default="")
    p.add_argument("--out", required=True)
    p.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "nanor1_gpu_bench"))
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--model", default="1.5b", choices=sorted(SHAPES))
    p.add_argument("--impl", default="ours", choices=["ours", "hf"])
    p.add_argument("--batch", type=int, default=64, choices=[64, 256])
    p.add_argument("--rc", type=int, default=0)  # record
    p.add_argument("--elapsed", type=float, default=0.0)
    p.add_argument("--timeout", type=int, default=0)
    p.add_argument("--log", default="")
    a = p.parse_args()
    a.name = a.name or a.cmd
    os.makedirs(os.path.join(a.out, "parts"), exist_ok=True)
    if a.cmd == "record":
        return cmd_record(a)
    if a.cmd == "summary":
        return cmd_summary(a)
    sys.path[:0] = [ROOT]
    os.makedirs(a.work, exist_ok=True)
    t0 = time.time()
    res = MEASUREMENTS[a.cmd](a)
    res["measure_s"] = time.time() - t0
    with open(os.path.join(a.out, "parts", f"{a.name}.json"), "w") as f:
        json.dump(res, f)
    print(json.dumps(res)[:2000])
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(rc or 0)  # everything is written: skip the interpreter's teardown of torch (~0.3 s a process)
