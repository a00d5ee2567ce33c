"""Tests for sample.py: the Engine (parity with transformers, cache == recompute, static == dynamic path,
padding invariance, seeds, fan-out, stops, compaction), the sampling step, eval metrics and the CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine  # noqa: E402
import sample  # noqa: E402
import tasks  # noqa: E402
from configurator import parse_overrides  # noqa: E402
from engine import Engine, _buckets, sample_tokens  # noqa: E402
from helpers import make_tiny_checkpoint  # noqa: E402
from model import Transformer  # noqa: E402
from tasks import load_problems, maj_at_k, majority_vote, pass_at_1, pass_at_k  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["What is 3 + 4?", "hi", "The answer is \\boxed{12}. And then some more words follow here", "7+8", "system"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models: one thread is fastest, and OpenMP spin-waits badly when the 2 CI cores are shared
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def mt(ckpt):
    return Transformer.from_pretrained(ckpt).eval(), Tokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def prompts(mt):
    tok = mt[1]
    ps = [tok.encode(t) for t in TEXTS]
    assert len({len(p) for p in ps}) == len(ps)  # all lengths differ: real left padding
    return ps


def record_decode(engine):
    """Wrap engine._decode to record (tokens fed, logits returned) at every step; a row not fed (done) has no logits,
    NaN in the record."""
    log, inner = [], engine._decode

    def wrapped(cache, tokens, fed=None):
        logits = inner(cache, tokens, fed)
        log.append((tokens.clone(), logits.clone() if fed is None else logits.masked_fill(~fed[:, None], float("nan"))))
        return logits

    engine._decode = wrapped
    return log


# ---- engine correctness ----------------------------------------------------------------------------


def test_greedy_matches_transformers(ckpt, mt, prompts):
    transformers = pytest.importorskip("transformers")
    model, tok = mt
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    N = 24
    L = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_id] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                          pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)[:, L:]
    out = Engine(model, tok).generate(prompts, max_new_tokens=N, temperature=0, ignore_eos=True)
    for i in range(len(prompts)):
        assert out[i][0].tokens == ref[i].tolist(), f"prompt {i}"
        assert out[i][0].finish_reason == "length"


@pytest.mark.parametrize("static", [False, True])
def test_cache_decode_logits_equal_full_recompute(mt, prompts, static):
    model, tok = mt
    engine = Engine(model, tok, static=static)
    log = record_decode(engine)
    N = 12
    out = engine.generate(prompts, num_samples=2, max_new_tokens=N, temperature=1.0, seed=3, ignore_eos=True)
    rows = [c for group in out for c in group]
    seqs = [prompts[r // 2] + rows[r].tokens for r in range(len(rows))]
    L = max(map(len, seqs))
    ids = torch.tensor([[0] * (L - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (L - len(s)) + [1] * len(s) for s in seqs])
    with torch.no_grad():
        full = model(ids, attention_mask=mask).float()
    assert len(log) == N - 1
    for step, (fed, logits) in enumerate(log):  # logits after feeding generated token `step`
        col = L - N + step  # column of generated token `step` (all rows left-aligned to the end)
        assert fed.tolist() == ids[:, col].tolist()
        assert (logits - full[:, col]).abs().max() <= 1e-4, f"step {step}"
    # the returned log-probs (T=1) are those of the full forward, for every generated token incl. the first
    lp = torch.log_softmax(full[:, L - N - 1:L - 1], -1).gather(-1, ids[:, L - N:, None])[..., 0]
    assert torch.allclose(torch.tensor([r.logprobs for r in rows]), lp, atol=1e-4)


def test_static_step_equals_dynamic_step(mt, prompts):
    model, tok = mt
    kw = dict(num_samples=2, max_new_tokens=10, temperature=0.9, top_p=0.95, seed=11)
    logs, outs = [], []
    for static in (False, True):
        e = Engine(model, tok, static=static)
        logs.append(record_decode(e))
        outs.append(e.generate(prompts, **kw))
    assert [[c.tokens for c in g] for g in outs[0]] == [[c.tokens for c in g] for g in outs[1]]
    for (fa, la), (fb, lb) in zip(*logs):
        assert torch.equal(fa, fb) and la.shape == lb.shape and torch.equal(la.isnan(), lb.isnan())
        assert (la - lb).nan_to_num().abs().max() <= 1e-5


def test_padding_invariance(mt, prompts):
    model, tok = mt
    engine = Engine(model, tok)
    long = tok.encode("a much longer prompt that forces a lot of left padding onto the short one " * 3)
    for temperature in (0, 1.0):
        alone = engine.generate([prompts[1]], max_new_tokens=16, temperature=temperature, seed=5, ignore_eos=True)
        padded = engine.generate([long, prompts[1]], max_new_tokens=16, temperature=temperature,
                                 seed=[0, 5], ignore_eos=True)
        assert alone[0][0].tokens == padded[1][0].tokens
        assert torch.allclose(torch.tensor(alone[0][0].logprobs), torch.tensor(padded[1][0].logprobs), atol=1e-5)


def test_seed_reproducibility(mt, prompts):
    model, tok = mt
    engine = Engine(model, tok)
    kw = dict(num_samples=2, max_new_tokens=16, temperature=1.0, top_k=50, ignore_eos=True)
    a = engine.generate(prompts, seed=123, **kw)
    b = engine.generate(prompts, seed=123, **kw)
    c = engine.generate(prompts, seed=124, **kw)
    toks = lambda out: [[s.tokens for s in g] for g in out]  # noqa: E731
    assert toks(a) == toks(b)
    assert toks(a) != toks(c)
    assert [[s.logprobs for s in g] for g in a] == [[s.logprobs for s in g] for g in b]


def test_generate_restores_train_mode(mt, prompts):
    model, tok = mt
    ref = Engine(model, tok).generate(prompts[:2], max_new_tokens=6, temperature=0)
    model.train()
    try:
        out = Engine(model, tok).generate(prompts[:2], max_new_tokens=6, temperature=0)
        assert model.training  # GRPO alternates rollouts and updates on one model
    finally:
        model.eval()
    assert [g[0].tokens for g in out] == [g[0].tokens for g in ref]


def test_fanout_equals_separate_sampling(mt, prompts):
    model, tok = mt
    engine = Engine(model, tok)
    G, seed = 3, 77
    kw = dict(max_new_tokens=14, temperature=1.0, top_p=0.9, ignore_eos=True)
    out = engine.generate(prompts[:3], num_samples=G, seed=seed, **kw)
    for i in range(3):
        for j in range(G):
            one = engine.generate([prompts[i]], num_samples=1, seed=seed + i * G + j, **kw)[0][0]
            assert out[i][j].seed == seed + i * G + j
            assert out[i][j].tokens == one.tokens, (i, j)
            assert torch.allclose(torch.tensor(out[i][j].logprobs), torch.tensor(one.logprobs), atol=1e-5)
    assert len({tuple(c.tokens) for c in out[0]}) > 1  # the G samples of a prompt differ


def test_stop_tokens_finish_reasons_and_compaction(mt, prompts):
    model, tok = mt
    N = 20
    free = Engine(model, tok).generate(prompts, max_new_tokens=N, temperature=0, ignore_eos=True)
    # stop on the token each row produced at a different step -> rows finish at different times
    stop_ids = [free[i][0].tokens[2 + 3 * i] for i in range(len(prompts))]
    engine = Engine(model, tok, compact_frac=0.2)
    log = record_decode(engine)
    out = engine.generate(prompts, max_new_tokens=N, temperature=0, stop=stop_ids, ignore_eos=True)
    never = Engine(model, tok, compact_frac=2.0).generate(prompts, max_new_tokens=N, temperature=0, stop=stop_ids,
                                                          ignore_eos=True)
    for i in range(len(prompts)):
        c, ref = out[i][0], free[i][0].tokens
        k = next(t for t, x in enumerate(ref) if x in stop_ids)
        assert c.tokens == ref[:k + 1] and c.finish_reason == "stop"
        assert c.text == tok.decode(ref[:k])  # the stop token is not in the text
        assert c.tokens == never[i][0].tokens and c.logprobs == pytest.approx(never[i][0].logprobs, abs=1e-5)
    sizes = [fed.shape[0] for fed, _ in log]
    assert sizes[0] == len(prompts) and sizes[-1] < len(prompts)  # finished rows were compacted away
    assert sorted(sizes, reverse=True) == sizes
    # length: nothing stops
    assert all(g[0].finish_reason == "length" and len(g[0].tokens) == N for g in free)
    # the tokenizer's EOS stops a row unless ignore_eos
    eos_out = Engine(model, tok).generate([prompts[0]], max_new_tokens=N, temperature=0, stop=None)
    first = next((t for t, x in enumerate(free[0][0].tokens) if x in tok.stop_ids), None)
    if first is not None:
        assert eos_out[0][0].tokens == free[0][0].tokens[:first + 1] and eos_out[0][0].finish_reason == "stop"


def test_stop_strings(mt, prompts):
    model, tok = mt
    engine = Engine(model, tok)
    full = engine.generate(prompts, max_new_tokens=24, temperature=1.0, seed=9, ignore_eos=True)
    for i in range(len(prompts)):
        text = full[i][0].text
        # a clean 2-char piece of the text from its middle (no replacement chars from split bytes)
        start = next((a for a in range(6, len(text) - 2) if "\ufffd" not in text[a:a + 2]), None)
        if start is None:
            continue
        stop = text[start:start + 2]
        c = engine.generate([prompts[i]], max_new_tokens=24, temperature=1.0, seed=9 + i, stop=[stop],
                            ignore_eos=True)[0][0]
        cut = text.find(stop) + len(stop)
        assert c.finish_reason == "stop"
        assert c.text == text[:cut] and c.text.endswith(stop)  # the stop string is kept, nothing after it
        assert c.tokens == full[i][0].tokens[:len(c.tokens)]
        assert stop not in tok.decode(c.tokens[:-1])  # cut at the token that completed it


# ---- CPU fast paths: oneDNN linears on packed weights, block argmax ---------------------------------

needs_onednn = pytest.mark.skipif(not engine.onednn_available(), reason="this PyTorch build has no oneDNN")


def has_patched_forward(model):
    return any("forward" in vars(m) for m in model.modules() if isinstance(m, torch.nn.Linear))


@needs_onednn
def test_onednn_linears_equal_f_linear(mt, prompts, monkeypatch):
    model, tok = mt
    monkeypatch.setattr("engine.ONEDNN_MIN_MACS", 0)  # every call through oneDNN, however small
    ids = torch.tensor([prompts[2]])
    with torch.inference_mode():
        ref = model(ids)
        with engine.onednn_linears(model), torch.profiler.profile() as prof:
            assert has_patched_forward(model)
            got = model(ids)
    ran = [e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise"]
    assert ran == [7 * model.config.num_hidden_layers + 1]  # q k v o gate up down per layer + lm_head
    assert not has_patched_forward(model)  # plain nn.Linear again after the block
    assert (got - ref).abs().max() <= 1e-4
    with pytest.raises(KeyError), engine.onednn_linears(model):
        raise KeyError("boom")
    assert not has_patched_forward(model)  # restored on an exception too
    kw = dict(num_samples=2, max_new_tokens=16, temperature=0, ignore_eos=True)
    plain, fast = Engine(model, tok, onednn=False), Engine(model, tok, onednn=True)
    for a, b in zip(plain.generate(prompts, **kw), fast.generate(prompts, **kw)):
        for ca, cb in zip(a, b):
            assert ca.tokens == cb.tokens
            assert max(abs(x - y) for x, y in zip(ca.logprobs, cb.logprobs)) <= 1e-4


@needs_onednn
def test_onednn_engine_repacks_only_changed_weights(ckpt, prompts, monkeypatch):
    # GRPO updates the weights in place between rollouts: the next generate must see the new weights
    monkeypatch.setattr("engine.ONEDNN_MIN_MACS", 0)
    tok = Tokenizer.from_pretrained(ckpt)
    model = Transformer.from_pretrained(ckpt).eval()
    engine = Engine(model, tok)
    assert engine.onednn  # the default for a float32 model on the CPU
    kw = dict(max_new_tokens=8, temperature=0, ignore_eos=True)
    before = engine.generate(prompts, **kw)
    packed = {name: w for name, (_, w) in engine._packed.items()}
    engine.generate(prompts, **kw)
    assert all(engine._packed[name][1] is w for name, w in packed.items())  # unchanged weights: no reorder
    torch.manual_seed(0)
    with torch.no_grad():  # like an optimizer step: in place, same storage
        model.model.layers[0].mlp.down_proj.weight.add_(torch.randn_like(model.model.layers[0].mlp.down_proj.weight))
    after = engine.generate(prompts, **kw)
    assert engine._packed["model.layers.0.mlp.down_proj"][1] is not packed["model.layers.0.mlp.down_proj"]
    assert engine._packed["model.layers.1.mlp.down_proj"][1] is packed["model.layers.1.mlp.down_proj"]
    ref = Engine(model, tok, onednn=False).generate(prompts, **kw)
    assert [g[0].tokens for g in after] == [g[0].tokens for g in ref]
    assert [g[0].tokens for g in after] != [g[0].tokens for g in before]
    engine.free()
    assert engine._packed == {}
    with pytest.raises(ValueError, match="float32 model on the CPU"):
        Engine(Transformer.from_pretrained(ckpt, dtype=torch.bfloat16), tok, onednn=True)


def test_argmax_rows_equals_argmax():
    torch.manual_seed(0)
    for V in (512, 32768, 500):  # 500: not a multiple of the block width, plain argmax
        x = torch.randn(6, V)
        x[1, 3] = x[1, 300] = x[1, 301] = 9.0  # ties across and within blocks: the first index wins
        x[2, V - 1] = 9.0
        x[3] = 1.0  # all equal
        x[4, :] = -float("inf")
        x[4, 200] = 0.0
        assert torch.equal(engine.argmax_rows(x), x.argmax(-1)), V


# ---- the sampling step -----------------------------------------------------------------------------


def test_sample_tokens_filters_and_distribution():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 2
    greedy, glp, _ = sample_tokens(logits, temperature=0)
    assert torch.equal(greedy, logits.argmax(-1))
    assert torch.allclose(glp, torch.log_softmax(logits, -1).gather(-1, greedy[:, None])[:, 0])
    u = torch.rand(4)
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=0.999)):
        assert torch.equal(sample_tokens(logits, u, temperature=0.7, **kw)[0], greedy)
    # log-probs are of the unfiltered temperature-scaled distribution
    t, lp, _ = sample_tokens(logits, u, temperature=0.5, top_k=3)
    assert torch.allclose(lp, torch.log_softmax(logits / 0.5, -1).gather(-1, t[:, None])[:, 0])
    buf = torch.full((6, 50), float("nan"))  # the Engine's reused log-softmax buffer (more rows than needed)
    for T in (0, 0.5, 1.0):
        plain = sample_tokens(logits, u, temperature=T, top_p=0.9)
        reused = sample_tokens(logits, u, temperature=T, top_p=0.9, out=buf)
        assert torch.equal(plain[0], reused[0]) and torch.equal(plain[1], reused[1])
    # empirical frequencies follow the filtered distribution
    row = logits[:1].expand(20000, -1)
    toks, _, _ = sample_tokens(row, torch.rand(20000, dtype=torch.float64), temperature=1.0, top_k=5)
    p = torch.softmax(logits[0], -1)
    keep = p.topk(5).indices
    q = torch.zeros(50)
    q[keep] = p[keep] / p[keep].sum()
    freq = torch.bincount(toks, minlength=50).float() / 20000
    assert set(toks.unique().tolist()) <= set(keep.tolist())
    assert (freq - q).abs().max() < 0.02
    # top_p keeps the smallest head reaching top_p
    sp = p.sort(descending=True).values
    n_head = int((sp.cumsum(0) < 0.8).sum()) + 1
    toks, _, _ = sample_tokens(row, torch.rand(20000, dtype=torch.float64), temperature=1.0, top_p=0.8)
    assert len(toks.unique()) == n_head


def _filtered_logprobs(logits, T, top_k=0, top_p=1.0, min_p=0.0):
    """log of the top-k / min-p / top-p filtered, renormalised distribution, straight from the definitions."""
    p = torch.softmax(logits.double() / T, -1)
    keep = torch.ones_like(p, dtype=torch.bool)
    if top_k:
        keep &= p >= p.topk(top_k, -1).values[:, -1:]
    if min_p:
        keep &= p >= min_p * p.max(-1, keepdim=True).values
    if top_p < 1:
        q = torch.where(keep, p, 0.0)
        sq, si = q.sort(-1, descending=True)
        head = (sq.cumsum(-1) - sq) < top_p * sq.sum(-1, keepdim=True)  # tokens before the head's mass reaches top_p
        keep &= torch.zeros_like(keep).scatter(-1, si, head)
    q = torch.where(keep, p, 0.0)
    return (q / q.sum(-1, keepdim=True)).log()


@pytest.mark.parametrize("kw", [dict(top_k=4), dict(top_p=0.7), dict(min_p=0.2), dict(top_k=8, top_p=0.9, min_p=0.05),
                                {}])
def test_sample_logprobs_are_of_the_filtered_renormalised_distribution(kw):
    torch.manual_seed(1)
    logits, u = torch.randn(64, 40) * 3, torch.rand(64, dtype=torch.float64)
    for T in (0.7, 1.0):
        tokens, lp, slp = sample_tokens(logits, u, temperature=T, **kw)
        want = _filtered_logprobs(logits, T, **kw).gather(-1, tokens[:, None])[:, 0]
        assert torch.isfinite(slp).all() and torch.allclose(slp.double(), want, atol=1e-5)
        if not kw:  # no filtering: the same values as logprobs
            assert torch.equal(slp, lp)
        else:
            assert (slp >= lp - 1e-6).all() and (slp > lp + 1e-3).any()  # renormalised over less than all the mass


def test_engine_completions_carry_sample_logprobs(mt, prompts):
    model, tok = mt
    kw = dict(num_samples=2, max_new_tokens=10, seed=5, ignore_eos=True)
    for c in (c for group in Engine(model, tok).generate(prompts, temperature=1.0, **kw) for c in group):
        assert c.sample_logprobs == c.logprobs
    top = [c for group in Engine(model, tok).generate(prompts, temperature=1.0, top_k=3, **kw) for c in group]
    for c in top:
        assert len(c.sample_logprobs) == len(c.tokens) == len(c.logprobs)
        assert all(s >= lp - 1e-6 for s, lp in zip(c.sample_logprobs, c.logprobs))
    assert any(s > lp + 1e-3 for c in top for s, lp in zip(c.sample_logprobs, c.logprobs))


# ---- metrics, data, CLI ----------------------------------------------------------------------------


def test_metrics():
    correct = [[True, False, False, False], [False, False, False, False], [True, True, False, True]]
    answers = [["1", "2", "3", "4"], ["5", "5", None, "6"], ["7", "7", "8", "7"]]
    assert pass_at_1(correct) == pytest.approx((0.25 + 0 + 0.75) / 3)
    assert pass_at_k(correct) == pytest.approx(2 / 3)
    assert majority_vote(["1", "2", "3", "4"]) == 0  # all tied: the first seen wins
    assert majority_vote(["a", "b", "b", "a"]) == 0
    assert majority_vote(["x", "b", "b", "a"]) == 1
    assert majority_vote([None, None]) is None
    assert majority_vote(["1.0", "2", "1"], equiv=lambda a, b: float(a) == float(b)) == 0
    assert maj_at_k(correct, answers) == pytest.approx(2 / 3)  # problems 0 (tie -> first) and 2


def test_load_problems_errors_name_file_and_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "answer": "1"}\n\n{"messages": [{"role": "user", "content": "b"}], "answer": 2}\n')
    assert len(load_problems(f)) == 2
    for bad, why in [('{"prompt": "a"}', r"missing field\(s\) 'answer'"), ('{"answer": "1"}', "'prompt'"),
                     ("{not json", "invalid JSON"), ("[1]", "JSON object")]:
        f.write_text('{"prompt": "a", "answer": "1"}\n' + bad + "\n")
        with pytest.raises(ValueError, match=rf"p.jsonl:2: .*{why}"):
            load_problems(f)


def test_parse_args():
    cfg = parse_overrides(["--temperature=0", "--eval", "--prompt=What is 2+3?", "--top_k=5"], sample.CONFIG)
    assert cfg["temperature"] == 0.0 and cfg["eval"] is True and cfg["prompt"] == "What is 2+3?" and cfg["top_k"] == 5
    with pytest.raises(SystemExit, match="unknown option"):
        parse_overrides(["--nope=1"], sample.CONFIG)
    assert parse_overrides(["--prompt=123", "--eval=0"], sample.CONFIG)["prompt"] == "123"  # text stays text
    for bad in (["--top_k=0.5"], ["--eval=maybe"], ["--top_k"], ["top_k=1"]):
        with pytest.raises(SystemExit):
            parse_overrides(bad, sample.CONFIG)


def test_cli_without_checkpoint_prints_usage(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sample.CONFIG, "init_from", str(tmp_path / "missing"))
    assert sample.main([]) == 0
    assert "usage" in capsys.readouterr().out


def test_cli_default_samples_the_shipped_base_model_in_its_pretraining_format(monkeypatch, capsys):
    monkeypatch.setattr(sample, "TINY_SFT", "/nonexistent/out/sft/ckpt")  # as on a fresh clone
    monkeypatch.setattr(sample, "TINY_GRPO", "/nonexistent/out/grpo/ckpt")
    assert sample.main(["--max_new_tokens=24", "--temperature=0"]) == 0
    printed = capsys.readouterr().out
    first = tasks.load_problems(sample.DEFAULT_DATA)[0]["prompt"]
    assert printed.startswith(f"Q: {first}\nA:") and "finish_reason=" in printed


def test_cli_streams_prompt(ckpt, mt, capsys):
    model, tok = mt
    assert sample.main([f"--init_from={ckpt}", "--prompt=What is 1 + 2?", "--prompt_template=chat", "--temperature=0",
                        "--max_new_tokens=12"]) == 0
    printed = capsys.readouterr().out
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}])
    c = Engine(model, tok).generate([ids], max_new_tokens=12, temperature=0)[0][0]
    assert printed.startswith(tok.decode(ids) + c.text)


def test_eval_single_process_and_torchrun_agree(ckpt, tmp_path):
    pytest.importorskip("reward")
    data = tmp_path / "probs.jsonl"
    rows = [{"prompt": f"What is {a}+{a}?", "answer": str(2 * a)} for a in range(5)]
    rows.append({"messages": [{"role": "user", "content": "What is 2+2?"}], "answer": "4"})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [f"--init_from={ckpt}", "--eval", f"--data={data}", "--num_samples=2", "--temperature=0.7",
            "--max_new_tokens=10", "--batch_size=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, "sample.py", *args, f"--out={tmp_path / 'one.jsonl'}"], cwd=REPO,
                            capture_output=True, text=True, env=env, timeout=120)
    assert single.returncode == 0, single.stderr
    assert "pass@1" in single.stdout and "maj@2" in single.stdout and "pass@2" in single.stdout
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "sample.py", *args,
                            f"--out={tmp_path / 'two.jsonl'}"], cwd=REPO, capture_output=True, text=True, env=env,
                           timeout=120)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = [json.loads(x) for x in (tmp_path / "one.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert len(one) == 12 and [r["problem_index"] for r in one] == [i for i in range(6) for _ in range(2)]
    assert one == two  # per-problem seeds: the split across ranks changes nothing
    summary = lambda out: next(x for x in out.splitlines() if "pass@1" in x).split("(")[0]  # noqa: E731
    assert summary(single.stdout) == summary(multi.stdout)


def test_graph_mode_logic_on_cpu(mt, prompts, monkeypatch):
    """Everything of the CUDA-graph path except the capture itself (no GPU here): the kept cache, one
    'graph' per batch bucket, compaction rounded up to a bucket with dummy rows, sync_every chunks."""
    model, tok = mt

    def fake_capture(self, step, restore):
        step(), restore()  # warmup, undone
        return step  # replaying = rerunning the step on the same static buffers

    monkeypatch.setattr(Engine, "_capture", fake_capture)
    N = 20
    free = Engine(model, tok).generate(prompts, num_samples=2, max_new_tokens=N, temperature=0, ignore_eos=True)
    stop_ids = [free[i][0].tokens[1 + 3 * i] for i in range(len(prompts))]
    kw = dict(num_samples=2, max_new_tokens=N, temperature=0.8, top_k=40, seed=4, stop=stop_ids, ignore_eos=True)
    ref = Engine(model, tok).generate(prompts, **kw)
    engine = Engine(model, tok, cuda_graphs=True, sync_every=4)
    assert engine.static
    for _ in range(2):  # the second call reuses the cache and the captured graphs
        out = engine.generate(prompts, **kw)
        for i in range(len(prompts)):
            for j in range(2):
                assert out[i][j].tokens == ref[i][j].tokens and out[i][j].finish_reason == ref[i][j].finish_reason
                assert out[i][j].logprobs == pytest.approx(ref[i][j].logprobs, abs=1e-5)
    assert len(engine._graphs) > 1 and set(engine._graphs) <= set(_buckets(2 * len(prompts)))


def test_eval_with_the_python_tool_on_a_qwen2_with_the_real_tokenizer(tmp_path):
    """`sample.py --eval --prompt_template=chat --tools=python --tool_format=code --out=FILE` on a tiny random Qwen2
    that has the real Qwen2.5 tokenizer and chat template: every record carries the completion's tokens, loss_mask
    and tool_calls; the code format lists no schemas in the prompt (the chat format does)."""
    import shutil

    from helpers import tiny_hf_checkpoint

    ck = tmp_path / "qwen"
    tiny_hf_checkpoint(ck, vocab_size=151936)
    fixtures = os.path.join(REPO, "tests", "fixtures", "tokenizers", "qwen2.5")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(fixtures, name), ck)
    data = tmp_path / "probs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a}*7?", "answer": str(7 * a)}) + "\n" for a in range(3)))
    out = tmp_path / "eval.jsonl"
    common = [f"--init_from={ck}", "--eval", f"--data={data}", "--prompt_template=chat", "--tools=python",
              "--temperature=0", "--max_new_tokens=12"]
    assert sample.main(common + ["--tool_format=code", f"--out={out}"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3
    for r in records:
        assert len(r["tokens"]) == len(r["loss_mask"]) == r["num_tokens"] and r["tool_calls"] == []
        assert set(r["loss_mask"]) == {1}  # no call was made: every token is the model's
    assert sample.main(common + ["--tool_format=chat", f"--out={tmp_path / 'chat.jsonl'}"]) == 0
    with pytest.raises(SystemExit, match="unknown tool"):
        sample.main(common + ["--tools=shell"])


def test_eval_records_of_completions_that_call_the_calculator(tmp_path):
    """`sample.py --eval --tools=calculator --out=FILE` on the shipped tool cold start, sampled: some completions call
    the calculator (it does in about a fifth of its samples), and their records show the call as the model saw it:
    the call with its exact result (or its error), the tool turn's tokens masked 0 in loss_mask, the model's own 1."""
    from reward import evaluate_arithmetic

    rows = [json.loads(line) for line in open(REPO / "data" / "tiny" / "test.jsonl")][:8]
    data = tmp_path / "probs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval.jsonl"
    assert sample.main([f"--init_from={REPO / 'data' / 'tiny' / 'tool_start'}", "--eval", f"--data={data}",
                        "--tools=calculator", "--tools_in_prompt=0", "--temperature=1", "--num_samples=8",
                        "--max_new_tokens=160", f"--out={out}"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 64
    tok = Tokenizer.from_pretrained(str(REPO / "data" / "tiny" / "tool_start"))
    calling = [r for r in records if r["tool_calls"]]
    assert 0 < len(calling) < len(records)
    for r in calling:
        assert len(r["tokens"]) == len(r["loss_mask"]) == r["num_tokens"]
        forced = tok.decode([t for t, m in zip(r["tokens"], r["loss_mask"]) if m == 0])
        for j, call in enumerate(r["tool_calls"]):
            if call["error"] is None:
                assert call["name"] == "calculator"
                assert call["result"] == str(evaluate_arithmetic(call["arguments"]["expression"]))
            else:  # a miswritten call (a misspelt key, an unclosed bracket) is answered with its error, never raised
                assert call["result"].startswith("Error:")
            # the result is what the Engine forced in, not what the model wrote; max_new_tokens may cut the last one
            cut = j == len(r["tool_calls"]) - 1 and r["num_tokens"] == 160
            assert call["result"] in forced or cut and call["result"].startswith(forced.split("<tool_response>\n")[-1])
        # the transcript shows the tool turns; the text, what the sample is scored on, is the model's own
        assert "<tool_response>" in forced and "<tool_response>" in r["transcript"]
        assert "<tool_response>" not in r["text"]
    for r in records:
        if not r["tool_calls"]:
            assert set(r["loss_mask"]) == {1}
