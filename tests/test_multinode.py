"""Two "nodes" of two processes each on localhost, as a multi-node launch runs them: torchrun --nnodes=2 started twice
against one c10d rendezvous endpoint, so RANK differs from LOCAL_RANK, there are two local groups, and each node has a
process with LOCAL_RANK 0. GRPO and SFT reach the parameters of one process (fp64, see test_grpo's DDP test), and
every file under out_dir is written by global rank 0 alone: an audit hook in every worker (a sitecustomize module on
PYTHONPATH) records each write, directory and rename under out_dir with the process's RANK and LOCAL_RANK."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file

import train_sft
from helpers import REPO, make_tiny_checkpoint
from test_grpo import _max_diff, _run
from test_grpo import data as grpo_data  # noqa: F401 (fixtures)
from test_sft import ckpt, sft_data  # noqa: F401
from test_wandb import STAND_IN

WRITE_AUDIT = r'''
import os, sys
if "RANK" in os.environ:
    _watch = os.path.realpath(os.environ["NANOR1_TEST_WATCH"]) + os.sep
    _who = f'{os.environ["RANK"]} {os.environ["LOCAL_RANK"]} {os.environ["GROUP_RANK"]}'
    _log = os.open(os.path.join(os.environ["NANOR1_TEST_WRITES"], f"rank{os.environ['RANK']}.txt"),
                   os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    _writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def _hook(event, args):
        if event == "open":
            if isinstance(args[0], int) or args[0] is None or not (any(c in (args[1] or "") for c in "wax+")
                                                                  or (args[2] or 0) & _writes):
                return
        elif event not in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree"):
            return
        paths = args[:2] if event == "os.rename" else args[:1]  # a rename writes where it lands as well
        for path in paths:
            path = os.path.realpath(os.fsdecode(path))
            if path.startswith(_watch):
                os.write(_log, f"{_who} {event} {path[len(_watch):]}\n".encode())

    sys.addaudithook(_hook)
    os.write(_log, f"{_who} start -\n".encode())
'''


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(script, args, watch, tmp_path, timeout=300, env=None, modules=None):
    """script under two torchrun agents (2 nodes x 2 processes, c10d rendezvous on localhost, gloo), env added to
    the environment and modules ({name: source}) importable; -> (both agents' output, [(rank, local_rank, node,
    event, path under watch)] of every worker). The writes that native code makes (safetensors, torch.save) are seen
    as the directory they go into."""
    hook_dir, writes = tmp_path / "audit_hook", tmp_path / "writes"
    hook_dir.mkdir(exist_ok=True)
    writes.mkdir(exist_ok=True)
    for old in writes.iterdir():
        old.unlink()
    for name, source in {"sitecustomize": WRITE_AUDIT, **(modules or {})}.items():
        (hook_dir / f"{name}.py").write_text(source)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(hook_dir), REPO]),
           "NANOR1_TEST_WATCH": str(watch), "NANOR1_TEST_WRITES": str(writes), "GLOO_SOCKET_IFNAME": "lo",
           **(env or {})}
    port = _free_port()
    agents = []
    for node in (0, 1):  # node 0 hosts the rendezvous store; the ranks each node's workers get come from it
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=nanor1-test",
               f"--rdzv_conf=is_host={int(node == 0)}", "--local_addr=127.0.0.1", os.path.join(REPO, script), *args]
        log = open(tmp_path / f"node{node}.log", "w+")  # files, not pipes: an unread pipe could stall a worker
        agents.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True), log))
    outs = []
    try:
        for proc, log in agents:
            proc.wait(timeout=timeout)
            log.seek(0)
            outs.append(log.read())
    finally:
        for proc, log in agents:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the agent and its workers
            log.close()
    for (proc, _), out in zip(agents, outs):
        assert proc.returncode == 0, out[-6000:]
    events = [line.split(" ", 4) for f in sorted(writes.iterdir()) for line in f.read_text().splitlines()]
    return "".join(outs), [(int(r), int(lr), int(n), e, p) for r, lr, n, e, p in events]


def _check_writes(events):
    """Ranks 2-3 ran on the other node as its LOCAL_RANK 0-1; something was written, all of it by global rank 0."""
    started = {(r, lr, n) for r, lr, n, e, _ in events if e == "start"}
    node_of_rank0 = next(n for r, _, n in started if r == 0)
    assert started == {(0, 0, node_of_rank0), (1, 1, node_of_rank0), (2, 0, 1 - node_of_rank0),
                       (3, 1, 1 - node_of_rank0)}
    writes = [e for e in events if e[3] != "start"]
    assert writes, "the audit hook saw no write under out_dir"
    assert {r for r, *_ in writes} == {0}, [e for e in writes if e[0] != 0][:10]


def test_grpo_on_two_nodes_equals_one_process(grpo_data, tmp_path):  # noqa: F811
    """3 steps of GRPO: rollouts, reference, clipping (minibatches=2 x ppo_epochs=2), an eval, two checkpoints and every
    step's rollouts logged."""
    init = make_tiny_checkpoint(str(tmp_path / "init"), std=0.1, model_type="qwen3", attention_bias=False,
                                qk_norm=True, head_dim=16)
    common = dict(init_from=init, data=grpo_data[0], eval_data=grpo_data[1], eval_every=2, eval_n=8, max_steps=3,
                  group_size=4, prompts_per_step=4, max_completion_len=16, progress=0, sample_every=0, log_rollouts=1,
                  warmup_steps=1, lr=1e-3, rewards="accuracy:1,language:1", minibatches=2, ppo_epochs=2, beta=0.04,
                  save_every=2, dtype="float64")
    out = tmp_path / "runs" / "grpo"
    stdout, events = two_nodes("train_grpo.py", [f"--{k}={v}" for k, v in {**common, "out_dir": out}.items()],
                               tmp_path / "runs", tmp_path)
    assert "world 4" in stdout and "held-out accuracy: before" in stdout
    _check_writes(events)
    written = {p for *_, e, p in events if e == "open"}
    assert {"grpo/metrics.jsonl", "grpo/rollouts.jsonl"} <= written and any("curves.svg" in p for p in written)
    assert any(e == "os.rename" and p == "grpo/ckpt.staging" for *_, e, p in events)  # the checkpoint swapped in
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]  # each line once
    rollouts = [json.loads(line) for line in open(out / "rollouts.jsonl")]
    assert [r["step"] for r in rollouts] == [s for s in (1, 2, 3) for _ in range(16)]

    _run(init, grpo_data, str(tmp_path / "one"), **{k: v for k, v in common.items() if k not in ("init_from", "data")})
    one = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl")]
    assert len(one) == len(metrics)
    for a, b in zip(metrics, one):
        for k in ("reward", "completion_len", "trained_rollouts", "eval_accuracy"):
            assert (k in a) == (k in b) and a.get(k, 0) == pytest.approx(b.get(k, 0), rel=1e-6), k
    a, b = (load_file(str(d / "ckpt" / "model.safetensors")) for d in (out, tmp_path / "one"))
    assert _max_diff(a, load_file(os.path.join(init, "model.safetensors"))) > 1e-3  # it trained...
    assert _max_diff(a, b) <= 1e-10  # ...as one process does


def test_sft_on_two_nodes_equals_one_process(ckpt, sft_data, tmp_path):  # noqa: F811
    """3 SFT steps of 4 examples (one per rank, or 4 in one process) with an eval, a checkpoint and W&B logging (a
    stand-in module): global rank 0 alone logs, not the other node's LOCAL_RANK 0."""
    common = dict(init_from=ckpt, data=sft_data, max_seq_len=96, max_steps=3, lr=3e-3, warmup_steps=1, eval_frac=0.1,
                  eval_every=2, progress=0, log_every=1, save_every=2, dtype="float64")
    out = tmp_path / "runs" / "sft"
    calls = tmp_path / "wandb_calls"
    calls.mkdir()
    stdout, events = two_nodes("train_sft.py", [f"--{k}={v}" for k, v in {**common, "out_dir": out, "batch_size": 1,
                                                                         "wandb_project": "nanor1"}.items()],
                               tmp_path / "runs", tmp_path, env={"NANOR1_FAKE_WANDB": str(calls)},
                               modules={"wandb": STAND_IN})
    assert "world 4" in stdout
    _check_writes(events)
    assert [p.name for p in calls.iterdir()] == ["rank0.jsonl"]
    assert [json.loads(line)["call"] for line in open(calls / "rank0.jsonl")] == ["init", "log", "log", "log", "finish"]
    assert "sft/metrics.jsonl" in {p for *_, e, p in events if e == "open"}
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3]
    single = train_sft.main([f"--{k}={v}" for k, v in {**common, "out_dir": str(tmp_path / "one"),
                                                        "batch_size": 4}.items()])
    last = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]
    assert last["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)  # (metrics.jsonl keeps 5 digits)
    a, b = (load_file(str(d / "ckpt" / "model.safetensors")) for d in (out, tmp_path / "one"))
    assert _max_diff(a, b) <= 1e-10
