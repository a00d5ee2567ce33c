"""bench/gpu.sh --smoke: every measurement of the GPU bench (issue 12) runs end to end on tiny shapes, each in its
own process, and leaves one JSON line with status ok and its figures, plus the summary (so the GPU script cannot
rot on a machine without a GPU)."""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMON = {"name", "status", "rc", "elapsed_s", "timeout_s", "smoke", "device", "gpu", "measure_s"}
DECODE = {"model", "batch", "tok_s", "decode_tok_s", "step_ms", "step_bytes", "achieved_bytes_per_s", "hbm_bandwidth",
          "roofline_frac", "meets_target", "cuda_graphs", "peak_mem_mb", "notes"}
ROLLOUT = {"impl", "model", "batch", "prompt_len", "new_tokens", "target_new_tokens", "temperature", "tok_s",
           "decode_tok_s", "step_ms", "peak_mem_mb", "notes"}
TRAIN = {"model", "batch", "seq", "tokens_per_s", "step_s", "flops_per_token", "mfu", "meets_target", "loss",
         "peak_mem_mb", "notes"}
EXPECTED = {
    "setup": {"torch", "transformers", "hbm_bandwidth", "peak_flops", "checkpoints"},
    "decode_b1_0.5b": DECODE,
    "decode_b1_1.5b": DECODE,
    "rollout_ours_b64_1.5b": ROLLOUT,
    "rollout_ours_b256_1.5b": ROLLOUT | {"target_tok_s", "meets_target", "frac_of_vllm_h100"},
    "rollout_hf_b64_1.5b": ROLLOUT,
    "rollout_hf_b256_1.5b": ROLLOUT,
    "sft_0.5b": TRAIN,
    "sft_1.5b": TRAIN,
    "grpo_update_0.5b": TRAIN | {"prompt_len", "completion_len"},
    "grpo_update_1.5b": TRAIN | {"prompt_len", "completion_len"},
    "grpo_e2e_1.5b": {"model", "group_size", "rows_per_step", "completion_len", "steps_run", "steps", "steady",
                      "logp_mismatch_max", "peak_by_phase_mb", "peak_reserved_mb", "fits_80gb", "flags", "notes"},
}


def test_gpu_bench_smoke(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "GPU_BENCH_WORK": str(tmp_path / "work")}
    proc = subprocess.run(["bash", "bench/gpu.sh", "--smoke", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by = {r["name"]: r for r in lines}
    failed = {n: r.get("error", "")[-1500:] for n, r in by.items() if r["status"] != "ok"}
    assert not failed, f"failed measurements: {failed}\n{proc.stdout[-2000:]}"
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert [r["name"] for r in lines] == [*EXPECTED, "summary"]  # one line each, in order, then the summary
    for name, keys in EXPECTED.items():
        r = by[name]
        missing = (COMMON | keys) - set(r)
        assert not missing, f"{name}: missing keys {sorted(missing)}"
        assert r["smoke"] is True and r["elapsed_s"] <= r["timeout_s"]
    assert set(by["setup"]["checkpoints"]) == {"0.5b", "1.5b"}
    for name in EXPECTED:
        if name.startswith(("decode", "rollout")):
            assert by[name]["tok_s"] > 0 and by[name]["decode_tok_s"] > 0 and by[name]["step_ms"] > 0
        if name.startswith(("sft", "grpo_update")):
            assert by[name]["tokens_per_s"] > 0 and by[name]["mfu"] > 0 and by[name]["flops_per_token"] > 0
    assert by["rollout_hf_b64_1.5b"]["new_tokens"] < by["rollout_ours_b64_1.5b"]["new_tokens"]  # said in the JSON
    assert by["rollout_hf_b64_1.5b"]["notes"]
    e2e = by["grpo_e2e_1.5b"]
    assert e2e["steps_run"] == len(e2e["steps"]) == 2
    for step in e2e["steps"]:
        assert step["time_gen"] > 0 and step["time_update"] > 0 and step["time_logp"] > 0  # beta > 0, 2 minibatches
    if e2e["device"] == "cpu":  # fp32 sampler and trainer: the same log-probs up to summation order
        assert e2e["logp_mismatch_max"] < 1e-3
    else:
        assert set(e2e["peak_by_phase_mb"]) == {"generation", "logprob", "update"}
    assert (out / "grpo_e2e_1.5b.metrics.jsonl").is_file()
    summary = by["summary"]
    assert summary["ok"] == summary["measurements"] == len(EXPECTED)
    text = (out / "summary.txt").read_text()
    assert "12/12 measurements ok" in text
    for name in EXPECTED:
        if name != "setup":
            assert name in text
