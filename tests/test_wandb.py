"""--wandb_project: every metrics.jsonl line also goes to Weights & Biases at its step, with the run's config, from
global rank 0 only; wandb is imported only when the flag is set, and a missing install stops the run before any model
loads. A stand-in wandb module records the calls: no network and no wandb package."""
import importlib.util
import json
import os
import sys

import pytest

import distill
import train_grpo
import train_sft
from helpers import REPO, torchrun
from test_grpo import _run as run_grpo
from test_grpo import ckpt as grpo_ckpt  # noqa: F401 (fixtures)
from test_grpo import data as grpo_data  # noqa: F401
from test_sft import _run as run_sft
from test_sft import ckpt, sft_data  # noqa: F401

STAND_IN = '''"""A stand-in for wandb: each call, as a JSON line, to $NANOR1_FAKE_WANDB/rank<RANK>.jsonl."""
import json
import os


def _record(call, **kw):
    path = os.path.join(os.environ["NANOR1_FAKE_WANDB"], f"rank{os.environ.get('RANK', '0')}.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps({"call": call, **kw}) + "\\n")


class Run:
    def log(self, data, step=None):
        _record("log", data=data, step=step)

    def finish(self):
        _record("finish")


def init(project=None, name=None, config=None):
    _record("init", project=project, name=name, config=config)
    return Run()
'''
DISTILL = [f"--data={os.path.join(REPO, 'data/tiny/train.jsonl')}", "--n_prompts=16", "--eval_data=", "--max_steps=2",
           "--batch_size=2", "--progress=0"]


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """The stand-in as `wandb` in this process (and its file for subprocesses); -> a function reading rank r's calls."""
    module_dir, calls = tmp_path / "stand_in", tmp_path / "calls"
    module_dir.mkdir()
    calls.mkdir()
    (module_dir / "wandb.py").write_text(STAND_IN)
    spec = importlib.util.spec_from_file_location("wandb", module_dir / "wandb.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.setenv("NANOR1_FAKE_WANDB", str(calls))

    def read(rank=0):
        path = calls / f"rank{rank}.jsonl"
        return [json.loads(line) for line in open(path)] if path.exists() else None
    read.module_dir = module_dir
    return read


def _check(calls, out_dir, project, run, config):
    """init once with the project, name and config; then each metrics.jsonl line at its step; finish last."""
    assert calls[0] == {"call": "init", "project": project, "name": run, "config": calls[0]["config"]}
    assert all(calls[0]["config"][k] == v for k, v in config.items())
    metrics = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    assert [(c["call"], c["step"], c["data"]) for c in calls[1:-1]] == [("log", m["step"], m) for m in metrics]
    assert calls[-1] == {"call": "finish"}


def test_grpo_logs_every_metrics_line(stand_in, grpo_ckpt, grpo_data, tmp_path):  # noqa: F811
    out = str(tmp_path / "grpo")
    run_grpo(grpo_ckpt, grpo_data, out, eval_n=4, eval_every=2, wandb_project="nanor1", wandb_run="grpo-test")
    _check(stand_in(), out, "nanor1", "grpo-test", {"lr": 1e-3, "group_size": 4, "wandb_project": "nanor1"})


def test_sft_logs_every_metrics_line(stand_in, ckpt, sft_data, tmp_path):  # noqa: F811
    out = str(tmp_path / "sft")
    run_sft(ckpt, sft_data, out, max_steps=3, wandb_project="nanor1")
    _check(stand_in(), out, "nanor1", None, {"lr": 3e-3, "max_steps": 3})  # no --wandb_run: W&B names the run


@pytest.mark.parametrize("mode", ["onpolicy", "sequence"])
def test_distill_logs_every_metrics_line(stand_in, tmp_path, mode):
    """sequence mode trains with train_sft.main, which opens the run (one run, the student's SFT lines)."""
    out = str(tmp_path / mode)
    distill.main(DISTILL + [f"--mode={mode}", f"--out_dir={out}", "--wandb_project=nanor1", "--wandb_run=d"])
    _check(stand_in(), out, "nanor1", "d", {"max_steps": 2})


def test_only_global_rank_0_logs(stand_in, ckpt, sft_data, tmp_path):  # noqa: F811
    out = str(tmp_path / "ddp")
    args = dict(init_from=ckpt, data=sft_data, out_dir=out, max_seq_len=96, batch_size=1, max_steps=2, eval_frac=0.1,
                eval_every=1, progress=0, log_every=1, wandb_project="nanor1", wandb_run="ddp")
    env = {"PYTHONPATH": os.pathsep.join([str(stand_in.module_dir), REPO]),
           "NANOR1_FAKE_WANDB": os.environ["NANOR1_FAKE_WANDB"]}
    assert "world 2" in torchrun("train_sft.py", [f"--{k}={v}" for k, v in args.items()], env=env)
    assert stand_in(1) is None  # rank 1 never called wandb
    _check(stand_in(0), out, "nanor1", "ddp", {"batch_size": 1})


@pytest.mark.parametrize("main", [train_grpo.main, train_sft.main, distill.main], ids=["grpo", "sft", "distill"])
def test_a_missing_wandb_stops_the_run_at_once(main, monkeypatch):
    """With no wandb installed (None in sys.modules: import fails), --wandb_project stops the run in one line, before
    it looks at --init_from; without the flag nothing imports wandb."""
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(SystemExit, match=r"^--wandb_project needs Weights & Biases: pip install wandb$"):
        main(["--wandb_project=nanor1", "--init_from=/no/such/checkpoint"])
    with pytest.raises((SystemExit, FileNotFoundError)) as e:  # the missing checkpoint, now
        main(["--init_from=/no/such/checkpoint"])
    assert "/no/such/checkpoint" in str(e.value)


def test_without_the_flag_nothing_imports_wandb(grpo_ckpt, grpo_data, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "wandb", None)  # any import of it would raise
    result, _, _ = run_grpo(grpo_ckpt, grpo_data, str(tmp_path / "plain"))
    assert result["step"] == 2
