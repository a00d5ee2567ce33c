"""Tests for sample.py's rejection sampling (R1 stage 3): each rejection reason on hand-made completions, the
per-prompt selection and the report on a stub engine with canned completions, the kept rows as train_sft.py
examples (ChatML and the R1-Distill template that opens <think> in the prompt), and the CLI on the shipped tiny
model, one process and torchrun x2."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import dataloader  # noqa: E402
import sample  # noqa: E402
import tasks  # noqa: E402
from engine import Completion, Engine  # noqa: E402
from helpers import make_tiny_tokenizer, torchrun  # noqa: E402
from rejection import REJECT_REASONS, check_sample, max_ngram_count, rejection_sample  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

RL_START = ROOT / "data/tiny/rl_start"
R1_FIXTURE = ROOT / "tests/fixtures/tokenizers/deepseek-r1-distill-qwen"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on the 2 shared cores
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_pretrained(make_tiny_tokenizer(str(tmp_path_factory.mktemp("tok"))))


@pytest.fixture(scope="module")
def r1_tok(tmp_path_factory):
    """The R1-Distill tokenizer with the later upstream template whose generation prompt opens the think block."""
    d = tmp_path_factory.mktemp("r1_think")
    shutil.copy(R1_FIXTURE / "tokenizer.json", d)
    cfg = json.loads((R1_FIXTURE / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template"] = cfg["chat_template"].replace("{{'<｜Assistant｜>'}}{% endif %}",
                                                        "{{'<｜Assistant｜><think>\\n'}}{% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    t = Tokenizer.from_pretrained(d)
    assert t.generation_prompt.endswith("<think>\n")
    return t


# ---- the pure filter ---------------------------------------------------------------------------------

GOOD = "<think>\n2+3=5\n</think>\n\\boxed{5}"
ROW = {"prompt": "What is 2+3?", "answer": "5"}
LOOP = "<think>\n" + "2+3=5, so 5\n" * 30 + "</think>\n\\boxed{5}"
CODE_ROW = {"prompt": "Write f(x) = x squared.", "tests": ["assert f(2) == 4", "assert f(-3) == 9"]}
CODE = "<think>\nsquare it\n</think>\n```python\ndef f(x):\n    return x * x\n```"


@pytest.mark.parametrize("text,finish,n_tokens,row,limits,reason", [
    (GOOD, "stop", 12, ROW, {}, None),
    ("  " + GOOD, "stop", 12, ROW, {}, None),  # leading whitespace is allowed by the strict format
    (GOOD, "length", 12, ROW, {}, "too_long"),  # truncated
    (GOOD, "stop", 41, ROW, {"max_completion_tokens": 40}, "too_long"),  # over the budget
    (GOOD, "stop", 40, ROW, {"max_completion_tokens": 40}, None),
    ("\\boxed{5}", "stop", 5, ROW, {}, "format"),  # no think block
    ("<think>\n2+3=5\n</think>\n", "stop", 9, ROW, {}, "format"),  # no answer after it
    ("<think>\n\n</think>\n\\boxed{5}", "stop", 9, ROW, {}, "format"),  # empty think
    ("<think>\n2+3=5\n</think></think>\n\\boxed{5}", "stop", 12, ROW, {}, "format"),  # two closings
    ("2+3=5\n</think>\n\\boxed{5}", "stop", 9, ROW, {}, "format"),  # <think> missing (not R1-Distill: no prefix)
    ("<think>\nadd two and three 得 5\n</think>\n\\boxed{5}", "stop", 12, ROW, {}, "language"),  # mixed CoT
    ("<think>\nadd two and three 得 5\n</think>\n\\boxed{5}", "stop", 12, ROW, {"min_language": 0.8}, None),
    ("<think>\nadd two and three 得 5\n</think>\n\\boxed{5}", "stop", 12, ROW, {"lang": "zh"}, "language"),
    ("<think>\n二加三得五\n</think>\n\\boxed{5}", "stop", 12, ROW, {"lang": "zh"}, None),
    (LOOP, "stop", 300, ROW, {}, "degenerate"),
    (LOOP, "stop", 300, ROW, {"max_ngram_repeats": 100}, None),
    ("<think>\n2+3=6\n</think>\n\\boxed{6}", "stop", 12, ROW, {}, "incorrect"),
    ("<think>\nthe answer is 5\n</think>\n\\boxed{6}", "stop", 12, ROW, {}, "incorrect"),  # only the answer counts
    (CODE, "stop", 30, CODE_ROW, {}, None),
    (CODE.replace("x * x", "x * 2"), "stop", 30, CODE_ROW, {}, "incorrect"),  # 1 of 2 tests pass: not kept
    # several failures: counted under the first in REJECT_REASONS order
    ("\\boxed{6}", "length", 5, ROW, {}, "too_long"),
    ("<think>\n2+3=6 得\n</think>\n", "stop", 12, ROW, {}, "format"),
    ("<think>\n" + "2 plus 3 得 6\n" * 30 + "</think>\n\\boxed{6}", "stop", 300, ROW, {}, "language"),
    (LOOP.replace("{5}", "{6}"), "stop", 300, ROW, {}, "degenerate"),
])
def test_each_rejection_reason(text, finish, n_tokens, row, limits, reason):
    assert check_sample(text, finish, n_tokens, row, **limits)[0] == reason


def test_check_sample_rewards_and_order():
    assert REJECT_REASONS == ("too_long", "format", "language", "degenerate", "incorrect", "duplicate",
                              "over_max_per_prompt")
    assert check_sample(GOOD, "stop", 12, ROW) == (None, {"format": 1.0, "language": 1.0, "accuracy": 1.0})
    assert check_sample(CODE, "stop", 30, CODE_ROW) == (None, {"format": 1.0, "language": 1.0, "code": 1.0})
    # a CoT with words: the language reward is reward.py's; without any (pure arithmetic) it mixes nothing
    assert check_sample("<think>\nadd them\n</think>\n\\boxed{5}", "stop", 9, ROW)[1]["language"] == 1.0
    assert check_sample("<think>\nadd 得\n</think>\n5", "stop", 9, ROW, min_language=0)[1]["language"] == 0.5
    assert check_sample("\\boxed{5}", "stop", 5, ROW) == ("format", {"format": 0.0})
    with pytest.raises(ValueError, match="neither 'answer' nor 'tests'"):
        check_sample(GOOD, "stop", 12, {"prompt": "q"})
    assert max_ngram_count("a b c a b c a b", 3) == 2 and max_ngram_count("a b", 3) == 0
    assert max_ngram_count("x ---------------------------------------- y", 1) == 1  # a symbol run is one piece


# ---- rejection_sample on a stub engine --------------------------------------------------------------


class StubEngine:
    """Engine.generate's interface with canned completions: canned[question] is the list of a problem's K
    samples as (text, n_tokens, finish_reason); the question is found in the decoded prompt. Each completion
    carries its row's seed, as the Engine's do."""

    def __init__(self, tok, canned):
        self.tok, self.canned, self.calls = tok, canned, []

    def generate(self, prompts, num_samples=1, seed=0, **sampling):
        self.calls.append(dict(seeds=list(seed), num_samples=num_samples, sampling=sampling))
        out, seeds = [], iter(seed)
        for ids in prompts:
            text = self.tok.decode(ids)
            samples = next(v for q, v in self.canned.items() if q in text)
            assert len(samples) == num_samples
            out.append([Completion(list(range(n)), t, [0.0] * n, f, next(seeds)) for t, n, f in samples])
        return out


def S(answer_text, n, finish="stop"):
    return (answer_text, n, finish)


P0_LONG, P0_SHORT = "<think>\n2+3\n2+3=5\n</think>\n\\boxed{5}", "<think>\n2+3=5\n</think>\n\\boxed{5}"
P2 = ["<think>\n7-2=5\n</think>\n\\boxed{5}", "<think>\n7-2 = 5\n</think>\n\\boxed{5}",
      "<think>\n7-2=4\n</think>\n\\boxed{4}", "<think>\n7 - 2 = 5\n</think>\n\\boxed{5}"]
CANNED = {
    "What is 2+3?": [S(P0_LONG, 30), S(P0_SHORT, 12), S(P0_SHORT, 12), S("<think>\n2+3=6\n</think>\n\\boxed{6}", 12)],
    "What is 4*4?": [S("<think>\n4*4=", 64, "length"), S("\\boxed{16}", 5),
                     S("<think>\n" + "4*4=16, so 16\n" * 30 + "</think>\n\\boxed{16}", 300),
                     S("<think>\nfour times four 是 16\n</think>\n\\boxed{16}", 15)],
    "What is 7-2?": [S(P2[0], 20), S(P2[1], 10), S(P2[2], 10), S(P2[3], 10)],
}
ROWS = [{"prompt": "What is 2+3?", "answer": "5"},
        {"messages": [{"role": "system", "content": "Be careful."}, {"role": "user", "content": "What is 4*4?"}],
         "answer": "16"},
        {"prompt": "What is 7-2?", "messages": [{"role": "user", "content": "What is 7-2?"}], "answer": "5"}]
FILES = ["a.jsonl", "a.jsonl", "b.jsonl"]


def run_stub(tok, **kw):
    engine = StubEngine(tok, CANNED)
    kept, report = rejection_sample(engine, tok, ROWS, **{"num_samples": 4, "seed": 100, "source": "ckpt/x",
                                                          "row_files": FILES, **kw})
    return engine, kept, report


def test_rejection_sample_keeps_the_shortest_good_one_and_reports(tok):
    engine, kept, report = run_stub(tok, sampling=dict(max_new_tokens=64, temperature=0.7))
    assert engine.calls == [dict(seeds=list(range(100, 112)), num_samples=4,  # one batch, seed + problem*K + sample
                                 sampling=dict(max_new_tokens=64, temperature=0.7))]
    assert [(r["problem_index"], r["sample_index"]) for r in kept] == [(0, 1), (2, 1)]
    assert kept[0] == {
        "messages": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": P0_SHORT}],
        "source": "ckpt/x", "source_file": "a.jsonl", "source_row": 0, "problem_index": 0, "sample_index": 1,
        "seed": 101, "num_tokens": 12, "parts": {"format": 1.0, "language": 1.0, "accuracy": 1.0}}
    assert kept[1]["messages"] == ROWS[2]["messages"] + [{"role": "assistant", "content": P2[1]}]  # tie 1 vs 3: first
    assert (kept[1]["source_file"], kept[1]["source_row"], kept[1]["seed"]) == ("b.jsonl", 0, 109)
    assert report["rejected"] == {"too_long": 1, "format": 1, "language": 1, "degenerate": 1, "incorrect": 2,
                                  "duplicate": 1, "over_max_per_prompt": 3}
    assert list(report["rejected"]) == list(REJECT_REASONS)
    assert (report["problems"], report["samples"], report["kept"], report["problems_with_kept"]) == (3, 12, 2, 2)
    assert report["acceptance_rate"] == pytest.approx(2 / 12) and report["mean_kept_tokens"] == 11
    assert report["per_source"] == {"a.jsonl": dict(problems=2, samples=8, kept=1, rate=0.125),
                                    "b.jsonl": dict(problems=1, samples=4, kept=1, rate=0.25)}
    assert report["settings"]["max_per_prompt"] == 1 and report["settings"]["source"] == "ckpt/x"
    json.dumps(report), json.dumps(kept)  # both serialise as they are
    # batching never changes a row (seeds follow the problem index)
    assert run_stub(tok, sampling=dict(max_new_tokens=64, temperature=0.7), batch_size=1)[1:] == (kept, report)


def test_max_per_prompt_and_prefer(tok):
    _, kept, report = run_stub(tok, max_per_prompt=0)  # no cap: every distinct good sample
    assert [(r["problem_index"], r["sample_index"]) for r in kept] == [(0, 0), (0, 1), (2, 0), (2, 1), (2, 3)]
    assert report["rejected"]["over_max_per_prompt"] == 0 and report["rejected"]["duplicate"] == 1
    _, kept, report = run_stub(tok, max_per_prompt=2)
    assert [(r["problem_index"], r["sample_index"]) for r in kept] == [(0, 0), (0, 1), (2, 1), (2, 3)]
    assert report["kept"] + sum(report["rejected"].values()) == report["samples"]
    picks = {}
    for seed in range(12):
        _, kept, _ = run_stub(tok, prefer="random", seed=seed)
        assert run_stub(tok, prefer="random", seed=seed)[1] == kept  # seeded
        picks[seed] = [r["sample_index"] for r in kept if r["problem_index"] == 2]
        assert len(picks[seed]) == 1 and picks[seed][0] in (0, 1, 3)
    assert len({p[0] for p in picks.values()}) > 1  # not always the same one
    with pytest.raises(ValueError, match="prefer"):
        run_stub(tok, prefer="longest")


def test_kept_rows_load_in_train_sft(tok, tmp_path):
    from data.jsonl import write_jsonl

    _, kept, _ = run_stub(tok, max_per_prompt=0)
    path = str(tmp_path / "sft.jsonl")
    write_jsonl(path, kept)
    examples, stats = dataloader.load_examples([path], tok, "sft", 256, log=lambda *a: 0)
    assert stats["rows"] == len(kept) and stats["skipped"] == stats["truncated"] == 0 and len(examples[0]) == len(kept)
    for row in kept:
        ids, mask = dataloader.row_to_example(row, tok, "sft", "x")
        prompt = tok.render_chat(row["messages"][:-1], add_generation_prompt=True)
        assert tok.decode(ids).startswith(prompt + row["messages"][-1]["content"])  # what the model saw + wrote
        learned = tok.decode([t for t, m in zip(ids, mask) if m])
        assert learned.startswith(row["messages"][-1]["content"])


def test_r1_distill_template_opens_think_in_the_prompt(r1_tok):
    """The R1-Distill template ends the prompt with "<think>\\n": the model writes the CoT straight away, the kept
    row's assistant turn gets the "<think>\\n" back in front, and SFT trains on exactly the generated text."""

    canned = {"What is 2+3?": [S("2+3=5\n</think>\n\n\\boxed{5}", 12), S("<think>\n2+3=5\n</think>\n\\boxed{5}", 13)]}
    kept, report = rejection_sample(StubEngine(r1_tok, canned), r1_tok, [ROW], num_samples=2)
    assert report["rejected"]["format"] == 1  # a second <think> after the prompt's is malformed
    content = kept[0]["messages"][-1]["content"]
    assert content == "<think>\n2+3=5\n</think>\n\n\\boxed{5}" and kept[0]["parts"]["format"] == 1.0
    ids, mask = dataloader.row_to_example(kept[0], r1_tok, "sft", "x")
    prompt_text = r1_tok.decode(tasks.encode_problem(r1_tok, ROW))
    assert r1_tok.decode(ids).startswith(prompt_text + "2+3=5\n</think>")


# ---- the CLI on the shipped tiny model ---------------------------------------------------------------


def test_cli_on_the_tiny_model_one_process_and_torchrun_agree(tmp_path, capsys):
    from data.jsonl import read_jsonl, write_jsonl
    from model import Transformer

    # 8 short held-out problems (3 operands, no parentheses) in two files, so the report has two sources
    easy = [r for r in read_jsonl(ROOT / "data/tiny/test.jsonl")
            if len(r["prompt"]) <= 15 and "(" not in r["prompt"]][:8]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a, easy[:5]), write_jsonl(b, easy[5:])
    args = ["--reject=1", f"--init_from={RL_START}", f"--data={a},{b}", "--num_samples=4", "--max_new_tokens=64",
            "--temperature=1.0", "--seed=0", "--max_per_prompt=2", "--batch_size=4"]
    assert sample.main(args + [f"--out={tmp_path / 'one.jsonl'}"]) == 0
    assert "kept" in capsys.readouterr().out
    one = read_jsonl(tmp_path / "one.jsonl")
    report = json.loads((tmp_path / "one.jsonl.report.json").read_text())
    assert report["kept"] == len(one) >= 1 and report["samples"] == 32
    assert report["kept"] + sum(report["rejected"].values()) == 32
    assert list(report["per_source"]) == [str(a), str(b)] and report["per_source"][str(b)]["samples"] == 12
    model, tok = Transformer.from_pretrained(RL_START).eval(), Tokenizer.from_pretrained(RL_START)
    engine = Engine(model, tok)
    for row in one:
        problem = easy[row["problem_index"]]
        text = row["messages"][-1]["content"]
        assert row["messages"][:-1] == problem["messages"] and row["source"] == str(RL_START)
        assert check_sample(text, "stop", row["num_tokens"], problem)[0] is None
        assert row["parts"] == {"format": 1.0, "language": 1.0, "accuracy": 1.0}
        assert row["seed"] == 0 + row["problem_index"] * 4 + row["sample_index"]
    row = one[0]  # the seed reproduces the sample
    c = engine.generate([tasks.encode_problem(tok, easy[row["problem_index"]])], max_new_tokens=64, temperature=1.0,
                        seed=row["seed"])[0][0]
    assert (c.text, len(c.tokens)) == (row["messages"][-1]["content"], row["num_tokens"])

    torchrun("sample.py", args + [f"--out={tmp_path / 'two.jsonl'}"], timeout=120)
    assert read_jsonl(tmp_path / "two.jsonl") == one  # rank 0 wrote the merged rows of one process
    assert json.loads((tmp_path / "two.jsonl.report.json").read_text()) == report
