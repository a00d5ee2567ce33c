"""distill.py: the logit-mode loss against F.kl_div, the on-policy reverse-KL estimate against a direct computation,
sequence mode going through stage 3's filters, vocabulary checks, exact resume and torchrun x2."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import distill
import engine
import losses
import rejection
from losses import chunked_forward_kl, completion_logprobs
from model import Transformer
from tests.helpers import make_tiny_checkpoint, make_tiny_tokenizer, torchrun, write_jsonl
from tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(REPO, "data/tiny/teacher")
STUDENT = os.path.join(REPO, "data/tiny/student")
TRAIN = os.path.join(REPO, "data/tiny/train.jsonl")
TEST = os.path.join(REPO, "data/tiny/test.jsonl")


# ---- the logit-mode loss


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("topk", [0, 5])
@pytest.mark.parametrize("chunk", [4, 1024])
def test_forward_kl_equals_kl_div_values_and_gradients(temperature, topk, chunk):
    torch.manual_seed(0)
    N, D, Dt, V = 13, 8, 6, 50
    h = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    th, tW = torch.randn(N, Dt, dtype=torch.float64), torch.randn(V, Dt, dtype=torch.float64)
    loss = chunked_forward_kl(h, W, th, tW, chunk_size=chunk, temperature=temperature, topk=topk)
    grads = torch.autograd.grad(loss, [h, W])

    t_logits = th @ tW.T / temperature  # the full [N, V] reference
    if topk:
        top, idx = t_logits.topk(topk, -1)
        p = torch.zeros_like(t_logits).scatter_(1, idx, torch.softmax(top, -1))
    else:
        p = torch.softmax(t_logits, -1)
    ref = F.kl_div(torch.log_softmax(h @ W.T / temperature, -1), p, reduction="sum") * temperature ** 2
    ref_grads = torch.autograd.grad(ref, [h, W])
    assert torch.allclose(loss, ref, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-10)


def test_forward_kl_is_zero_for_the_teacher_itself_and_refuses_two_vocabularies():
    torch.manual_seed(1)
    h, W = torch.randn(7, 8), torch.randn(30, 8)
    assert chunked_forward_kl(h, W, h, W).abs() < 1e-5
    with pytest.raises(ValueError, match="one vocabulary"):
        chunked_forward_kl(h, W, h, torch.randn(31, 8))


# ---- the on-policy estimate


def test_reverse_kl_estimate_matches_a_direct_computation(tmp_path):
    """k_t = log pi_s(x_t) - log pi_t(x_t) on the student's own samples, from the chunked log-prob code, equals the
    log-softmax of full forward passes; its mean over samples approaches the exact KL(pi_s || pi_t); and the loss's
    gradient is sum_t k_t grad log pi_s(x_t)."""
    s_dir = make_tiny_checkpoint(tmp_path / "s", seed=1)
    t_dir = make_tiny_checkpoint(tmp_path / "t", seed=2)
    student, teacher = Transformer.from_pretrained(s_dir), Transformer.from_pretrained(t_dir)
    tok = Tokenizer.from_pretrained(s_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}])
    outs = engine.Engine(student, tok).generate([prompt], num_samples=4, max_new_tokens=12, seed=3, temperature=1.0)[0]
    rows = [(prompt, c.tokens) for c in outs]
    s_lp = completion_logprobs(student, rows, tok.pad_id, 5, 1.0, "cpu")
    with torch.no_grad():
        t_lp = completion_logprobs(teacher, rows, tok.pad_id, 5, 1.0, "cpu")
    mask = torch.zeros_like(s_lp)
    for b, (p, c) in enumerate(rows):
        mask[b, :len(c)] = 1
        ids = torch.tensor([p + c])
        with torch.no_grad():
            direct_s = torch.log_softmax(student(ids)[0, len(p) - 1:-1].double(), -1)
            direct_t = torch.log_softmax(teacher(ids)[0, len(p) - 1:-1].double(), -1)
        y = torch.tensor(c)[:, None]
        k_direct = (direct_s.gather(1, y) - direct_t.gather(1, y))[:, 0]
        assert torch.allclose((s_lp - t_lp)[b, :len(c)].double(), k_direct, atol=1e-5)
        # sampled tokens are the sampler's: the Engine's own log-probs agree with the student's
        assert torch.allclose(torch.tensor(outs[b].logprobs, dtype=torch.float64), direct_s.gather(1, y)[:, 0],
                              atol=1e-4)

    loss, k_sum = losses.reverse_kl_loss(s_lp, t_lp, mask)
    assert torch.allclose(k_sum, ((s_lp - t_lp) * mask).sum())
    params = [p for p in student.parameters()]
    g = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    k = ((s_lp - t_lp) * mask).detach()
    g_ref = torch.autograd.grad((k * s_lp).sum(), params, allow_unused=True)
    for a, b in zip(g, g_ref):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)

    # Monte-Carlo: at one position, the mean of k over tokens drawn from pi_s is KL(pi_s || pi_t)
    with torch.no_grad():
        ls = torch.log_softmax(student(torch.tensor([prompt]))[0, -1].double(), -1)
        lt = torch.log_softmax(teacher(torch.tensor([prompt]))[0, -1].double(), -1)
    exact = float((ls.exp() * (ls - lt)).sum())
    draws = torch.multinomial(ls.exp(), 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimate = float((ls - lt)[draws].mean())
    assert abs(estimate - exact) < 0.02 * max(1.0, exact)


# ---- sequence mode: the stage-3 filters decide what the student sees


def test_sequence_mode_trains_only_on_samples_the_filters_kept(tmp_path, monkeypatch):
    seen = {}  # an assistant turn's text -> the reasons check_sample gave it
    real_check = rejection.check_sample

    def recording_check(text, *args, **kwargs):
        reason, parts = real_check(text, *args, **kwargs)
        seen.setdefault(text, set()).add(reason)
        return reason, parts

    monkeypatch.setattr(rejection, "check_sample", recording_check)
    import train_sft
    trained_on = {}
    real_main = train_sft.main

    def recording_main(argv=(), **overrides):  # a plain call with keyword arguments, no argv list
        assert not argv
        trained_on["rows"] = [json.loads(line) for line in open(overrides["data"])]
        return real_main(**overrides)

    monkeypatch.setattr(train_sft, "main", recording_main)
    out = tmp_path / "d"
    res = distill.main([f"--teacher={TEACHER}", f"--init_from={STUDENT}", f"--data={TRAIN}", "--n_prompts=24",
                        f"--eval_data={TEST}", "--eval_n=8", "--max_steps=2", "--temperature=1.5",
                        f"--out_dir={out}", "--progress=0"])
    assert res["finished"] and res["after"] is not None
    rows = trained_on["rows"]
    report = json.load(open(out / "teacher_samples.jsonl.report.json"))
    assert len(rows) == report["kept"] > 0
    assert sum(report["rejected"].values()) > 0  # T=1.5: some samples fail, and those must not reach the student
    for r in rows:
        text = r["messages"][-1]["content"]
        assert seen[text] == {None}, (text, seen[text])
        assert r["source"] == TEACHER and "seed" in r and r["parts"]["accuracy"] == 1.0
    assert Transformer.from_pretrained(str(out / "ckpt")).config.hidden_size == 128  # the student, trained


# ---- vocabularies


def test_logit_and_onpolicy_refuse_a_different_tokenizer(tmp_path):
    other = make_tiny_checkpoint(tmp_path / "other")  # the tests' tokenizer, not the tiny world's
    for mode in ("logit", "onpolicy"):
        with pytest.raises(SystemExit, match="different vocabularies.*same tokenizer"):
            distill.main([f"--mode={mode}", f"--teacher={TEACHER}", f"--init_from={other}", "--progress=0",
                          f"--out_dir={tmp_path / mode}"])


def test_sequence_mode_works_across_tokenizers(tmp_path):
    """The student reads the teacher's samples as text: a student with another tokenizer is fine."""
    tok_dir = make_tiny_tokenizer(tmp_path / "tok", vocab_size=400)
    other = make_tiny_checkpoint(tmp_path / "other", vocab_size=Tokenizer.from_pretrained(tok_dir).vocab_size)
    res = distill.main([f"--teacher={TEACHER}", f"--init_from={other}", f"--data={TRAIN}", "--n_prompts=8",
                        "--eval_data=", "--max_steps=1", f"--out_dir={tmp_path / 'd'}", "--progress=0"])
    assert res["finished"] and os.path.isfile(tmp_path / "d" / "ckpt" / "model.safetensors")


def test_padded_heads_of_one_tokenizer_are_compared_on_the_shared_words(tmp_path):
    """Qwen2.5 checkpoints pad the head to different sizes (151936 vs 152064) around one tokenizer: allowed."""
    s = make_tiny_checkpoint(tmp_path / "s", seed=1)
    t = make_tiny_checkpoint(tmp_path / "t", seed=2, vocab_size=Tokenizer.from_pretrained(s).vocab_size + 40)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)}
                                                 for i in range(4)])
    res = distill.main(["--mode=onpolicy", f"--teacher={t}", f"--init_from={s}", f"--data={prompts}", "--eval_data=",
                        "--max_steps=1", "--prompts_per_step=2", "--max_new_tokens=8", f"--out_dir={tmp_path / 'd'}",
                        "--progress=0"])
    assert res["finished"]


# ---- resume and torchrun


def _state(path):
    return Transformer.from_pretrained(path).state_dict()


@pytest.mark.parametrize("mode", ["logit", "onpolicy"])
def test_kill_and_resume_reaches_the_same_weights(tmp_path, mode):
    common = [f"--mode={mode}", f"--data={TRAIN}", "--n_prompts=16", "--eval_data=", "--max_steps=4",
              "--batch_size=4", "--prompts_per_step=4", "--samples_per_prompt=2", "--max_new_tokens=48",
              "--progress=0", "--topk=4"]
    distill.main(common + [f"--out_dir={tmp_path / 'full'}"])
    distill.main(common + [f"--out_dir={tmp_path / 'cut'}", "--stop_after=2", "--save_every=2"])
    distill.main(common + [f"--out_dir={tmp_path / 'cut'}", "--resume=1"])
    a, b = _state(tmp_path / "full" / "ckpt"), _state(tmp_path / "cut" / "ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(x) for x in open(tmp_path / "cut" / "metrics.jsonl")]
    assert [r["step"] for r in lines if "step" in r][-1] == 4


def test_sequence_mode_resumes_with_the_same_teacher_samples(tmp_path):
    common = [f"--data={TRAIN}", "--n_prompts=16", "--eval_data=", "--max_steps=4", "--batch_size=2", "--progress=0"]
    distill.main(common + [f"--out_dir={tmp_path / 'full'}"])
    res = distill.main(common + [f"--out_dir={tmp_path / 'cut'}", "--stop_after=2", "--save_every=2"])
    assert not res["finished"]
    samples = (tmp_path / "cut" / "teacher_samples.jsonl").read_text()
    res = distill.main(common + [f"--out_dir={tmp_path / 'cut'}", "--resume=1"])
    assert res["finished"] and (tmp_path / "cut" / "teacher_samples.jsonl").read_text() == samples
    assert samples == (tmp_path / "full" / "teacher_samples.jsonl").read_text()
    a, b = _state(tmp_path / "full" / "ckpt"), _state(tmp_path / "cut" / "ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_ranks_equal_one_process(tmp_path):
    """In fp64: AdamW turns the rounding of another summation order into steps of up to lr."""
    common = ["--dtype=float64", "--mode=onpolicy", f"--data={TRAIN}", "--n_prompts=16", "--eval_data=",
              "--max_steps=2", "--prompts_per_step=4", "--samples_per_prompt=2", "--max_new_tokens=48", "--progress=0"]
    torchrun("distill.py", common + [f"--out_dir={tmp_path / 'two'}"])
    distill.main(common + [f"--out_dir={tmp_path / 'one'}"])
    a, b = _state(tmp_path / "one" / "ckpt"), _state(tmp_path / "two" / "ckpt")
    init = _state(os.path.join(REPO, "data/tiny/student"))
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-4  # it trained...
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-10  # ...as one process does


def test_bad_mode_and_missing_checkpoint_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="--mode=soft: expected one of sequence, logit, onpolicy"):
        distill.main(["--mode=soft"])
    with pytest.raises(SystemExit, match="--teacher=.*nope: no config.json"):
        distill.main([f"--teacher={tmp_path / 'nope'}"])
