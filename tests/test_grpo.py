"""train_grpo.py: the clipped GRPO/DAPO/Dr. GRPO/GSPO loss against a slow reference, group advantages, the CLI end
to end on a tiny random model, DDP == one process, exact resume, the reference model, dynamic sampling, input
errors, recipes and the text plot."""
import contextlib
import glob
import io
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import losses
import train_grpo
from engine import Completion
from helpers import make_tiny_checkpoint, torchrun, write_jsonl
from model import ModelConfig, Transformer
from train_common import Runtime, make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny models gain nothing from intra-op threads, and on a machine whose cores other jobs share, OpenMP
    barriers make 2-thread matmuls up to ~50x slower: run this module on one thread (torchrun's ranks too)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


REQUIRED_METRICS = ["step", "reward", "reward/accuracy", "accuracy", "completion_len", "completion_len_max",
                    "truncated_frac", "kl", "clip_frac", "entropy", "zero_std_frac", "time_gen", "time_logp",
                    "time_update", "time_step", "gen_tok_s", "peak_mem_mb", "logp_mismatch", "rollout_is_mean",
                    "rollout_is_max", "rollout_is_clipped_frac", "mismatch_kl"]


# -----------------------------------------------------------------------------
# grpo_loss against a direct per-token loop


def _slow_grpo(lp, old, ref, adv, mask, eps_low, eps_high, beta, loss_agg, importance_sampling, max_len):
    """The docstring's formula, one token at a time with Python control flow (autograd through 0-d tensors).
    -> (loss, count of clipped-low tokens, count of clipped-high tokens, masked k3 sum)."""
    B, T = lp.shape
    row_sums, row_lens = [], []
    n_low = n_high = 0
    kl_sum = 0.0
    for i in range(B):
        toks = [t for t in range(T) if mask[i, t]]
        a = float(adv[i])
        if importance_sampling == "sequence" and toks:
            s = 0.0
            for t in toks:
                s = s + (lp[i, t] - old[i, t])
            seq_ratio = torch.exp(s / len(toks))
        total = 0.0
        for t in toks:
            rho = torch.exp(lp[i, t] - old[i, t]) if importance_sampling == "token" else seq_ratio
            r = float(rho.detach())
            c = min(max(r, 1 - eps_low), 1 + eps_high)
            clipped = rho if c == r else torch.tensor(c, dtype=lp.dtype)  # clipped: a constant, no gradient
            obj = rho * a if r * a <= c * a else clipped * a
            n_low += r < 1 - eps_low and a < 0
            n_high += r > 1 + eps_high and a > 0
            target = ref if ref is not None else old
            d = target[i, t] - lp[i, t]
            k3 = torch.exp(d) - d - 1
            kl_sum += float(k3.detach())
            if beta:
                obj = obj - beta * k3
            total = total + obj
        row_sums.append(total)
        row_lens.append(len(toks))
    if loss_agg == "sequence":
        kept = [(s, n) for s, n in zip(row_sums, row_lens) if n]
        loss = -sum(s / n for s, n in kept) / len(kept)
    elif loss_agg == "token":
        loss = -sum(row_sums) / sum(row_lens)
    else:
        loss = -sum(row_sums) / (B * max_len)
    return loss, n_low, n_high, kl_sum


def _loss_inputs(seed=0, B=4, T=6):
    """float64 log-probs with log-ratios lp - old = row offset (+-0.4) + N(0, 0.3) noise, so ratios fall outside
    [0.8, 1.28] on both sides, in rows with positive and with negative advantages."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    lp = -(torch.rand(B, T, **f64) * 3 + 0.1)
    offset = torch.tensor([0.4, -0.4, 0.4, -0.4] * (B // 4), dtype=torch.float64)[:, None]
    old = lp - offset - 0.3 * torch.randn(B, T, **f64)
    ref = lp + 0.5 * torch.randn(B, T, **f64)
    adv = torch.tensor([1.3, -0.7, -1.1, 0.9] * (B // 4), dtype=torch.float64)  # clipped high, low; free, free
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[torch.arange(B), torch.randint(0, T, (B,), generator=g)] = True  # every row has a token
    assert 0 < (~mask).sum() and mask.any(-1).all()
    return lp, old, ref, adv, mask.long()


@pytest.mark.parametrize("clip", [(0.2, 0.2), (0.2, 0.28)], ids=["sym", "clip-higher"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("importance_sampling", ["token", "sequence"])
@pytest.mark.parametrize("loss_agg", ["sequence", "token", "constant"])
def test_grpo_loss_value_and_grad_match_slow_loop(loss_agg, importance_sampling, beta, clip):
    lp, old, ref, adv, mask = _loss_inputs()
    eps_low, eps_high = clip
    ref_arg = ref if beta else None
    L = 8
    x = lp.clone().requires_grad_(True)
    loss, stats = losses.grpo_loss(x, old, ref_arg, adv, mask, eps_low, eps_high, beta, loss_agg,
                                       importance_sampling, max_completion_len=L)
    (grad,) = torch.autograd.grad(loss, x)
    y = lp.clone().requires_grad_(True)
    slow, n_low, n_high, kl_sum = _slow_grpo(y, old, ref_arg, adv, mask, eps_low, eps_high, beta, loss_agg,
                                             importance_sampling, L)
    (slow_grad,) = torch.autograd.grad(slow, y)
    torch.testing.assert_close(loss, slow, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, slow_grad, rtol=1e-10, atol=1e-12)
    assert grad.abs().sum() > 0 and (grad[mask == 0] == 0).all()  # masked tokens get exactly no gradient
    n = int(mask.sum())
    assert stats["tokens"] == n
    assert stats["clip_frac_low"] == pytest.approx(n_low / n) and stats["clip_frac_high"] == pytest.approx(n_high / n)
    assert stats["clip_frac"] == pytest.approx(stats["clip_frac_low"] + stats["clip_frac_high"])
    assert stats["kl"] == pytest.approx(kl_sum / n, rel=1e-10) and stats["kl"] > 0
    # the data really exercises both clip bounds (rows 0 and 1), with both advantage signs
    assert stats["clip_frac_low"] > 0 and stats["clip_frac_high"] > 0
    if importance_sampling == "token" and not beta:  # clipped tokens, and only those, get no gradient
        assert 0 < (grad[mask == 1] == 0).sum() < n


@pytest.mark.parametrize("importance_sampling", ["token", "sequence"])
@pytest.mark.parametrize("loss_agg", ["sequence", "token", "constant"])
def test_tool_tokens_do_not_enter_the_loss(loss_agg, importance_sampling):
    """A tool's answer forced into the middle of a completion (loss_mask 0 there): whatever the log-probs of those
    positions (the sampler reports 0 for them), the loss, its gradient, the rollout IS weights and every normaliser
    are those of the model's own tokens alone."""
    lp, old, ref, adv, _ = _loss_inputs(B=4, T=10)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[:, 3:7] = 0  # the forced span
    mask[1, 8:] = 0  # and a shorter completion
    sampler = old.clone()

    def run(lp, old, ref, sampler):
        x = lp.clone().requires_grad_(True)
        w, ist = losses.rollout_is_weights(old, sampler, mask, "token_truncate", 2.0)
        loss, st = losses.grpo_loss(x, old, ref, adv, mask, 0.2, 0.28, 0.1, loss_agg, importance_sampling, 10,
                                    normalizer=losses.loss_normalizer(mask.sum(-1), loss_agg, 10), is_weights=w)
        return loss, torch.autograd.grad(loss, x)[0], w, ist, st

    base = run(lp, old, ref, sampler)
    forced = mask == 0
    perturbed = run(lp.masked_fill(forced, -30.0), old.masked_fill(forced, 5.0), ref.masked_fill(forced, -9.0),
                    sampler.masked_fill(forced, 0.0))
    torch.testing.assert_close(perturbed[0], base[0], rtol=0, atol=0)
    torch.testing.assert_close(perturbed[1], base[1], rtol=0, atol=0)
    assert (base[1][forced] == 0).all() and (base[2][forced] == 0).all()
    assert perturbed[3] == base[3] and perturbed[4] == base[4] and base[4]["tokens"] == int(mask.sum())
    assert losses.loss_normalizer(mask.sum(-1), "token") == int(mask.sum())  # model tokens only


@pytest.mark.parametrize("loss_agg", ["sequence", "token", "constant"])
def test_grpo_loss_with_an_empty_row(loss_agg):
    """A row with no masked token (overlong=mask) adds nothing and, for sequence, is not counted as a row."""
    lp, old, ref, adv, mask = _loss_inputs()
    mask[2] = 0
    x = lp.clone().requires_grad_(True)
    loss, stats = losses.grpo_loss(x, old, ref, adv, mask, 0.2, 0.28, 0.1, loss_agg, "sequence", 8)
    y = lp.clone().requires_grad_(True)
    slow = _slow_grpo(y, old, ref, adv, mask, 0.2, 0.28, 0.1, loss_agg, "sequence", 8)[0]
    torch.testing.assert_close(loss, slow, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(slow, y)[0], rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize("importance_sampling", ["token", "sequence"])
@pytest.mark.parametrize("loss_agg", ["sequence", "token", "constant"])
def test_grpo_loss_normalizer_splits_a_batch_exactly(loss_agg, importance_sampling):
    """Two halves, each divided by the whole batch's count, sum to the one-call loss and gradient (what
    micro-batches and DDP ranks rely on)."""
    lp, old, ref, adv, mask = _loss_inputs(seed=1, B=8)
    mask[5] = 0  # an empty row in the second half: still counted correctly
    L = 8
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, beta=0.1, loss_agg=loss_agg,
              importance_sampling=importance_sampling, max_completion_len=L)
    x = lp.clone().requires_grad_(True)
    whole, _ = losses.grpo_loss(x, old, ref, adv, mask, **kw)
    (g_whole,) = torch.autograd.grad(whole, x)
    count = {"sequence": int((mask.sum(-1) > 0).sum()), "token": int(mask.sum()), "constant": 8 * L}[loss_agg]
    # the one rule, from a tensor of row lengths here and from a list of them in train_grpo.policy_update
    assert losses.loss_normalizer(mask.sum(-1), loss_agg, L) == losses.loss_normalizer(mask.sum(-1).tolist(),
                                                                                         loss_agg, L) == count
    y = lp.clone().requires_grad_(True)
    parts = [losses.grpo_loss(y[s], old[s], ref[s], adv[s], mask[s], normalizer=float(count), **kw)[0]
             for s in (slice(0, 4), slice(4, 8))]
    (g_split,) = torch.autograd.grad(parts[0] + parts[1], y)
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_split, g_whole, rtol=1e-12, atol=1e-14)
    # without the normaliser each half uses its own count: not the same loss
    own = sum(losses.grpo_loss(lp[s], old[s], ref[s], adv[s], mask[s], **kw)[0] for s in (slice(0, 4),
                                                                                             slice(4, 8)))
    assert not torch.allclose(own, whole)


def test_grpo_loss_argument_errors():
    lp, old, ref, adv, mask = _loss_inputs()
    with pytest.raises(ValueError, match="ref_logprobs"):
        losses.grpo_loss(lp, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_len"):
        losses.grpo_loss(lp, old, None, adv, mask, loss_agg="constant")
    with pytest.raises(ValueError, match="loss_agg"):
        losses.grpo_loss(lp, old, None, adv, mask, loss_agg="mean")
    with pytest.raises(ValueError, match="max_completion_len"):  # also when the caller gives the normaliser
        losses.grpo_loss(lp, old, None, adv, mask, loss_agg="constant", normalizer=1.0)
    with pytest.raises(ValueError, match="loss_agg"):
        losses.grpo_loss(lp, old, None, adv, mask, loss_agg="mean", normalizer=1.0)
    with pytest.raises(ValueError, match="max_completion_len"):
        losses.loss_normalizer([1, 2], "constant")
    with pytest.raises(ValueError, match="importance_sampling"):
        losses.grpo_loss(lp, old, None, adv, mask, importance_sampling="tok")


# -----------------------------------------------------------------------------
# rollout importance sampling: the sampler's distribution is not the trainer's pi_old


def _direct_is_weights(lp, slp, mask, mode, cap, floor):
    """losses.rollout_is_weights' docstring, one row and one token at a time in float64."""
    B, T = lp.shape
    w = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        toks = [t for t in range(T) if mask[i, t]]
        prod = 1.0
        for t in toks:
            prod *= float(torch.exp(lp[i, t].double() - slp[i, t].double()))
        for t in toks:
            r = float(torch.exp(lp[i, t].double() - slp[i, t].double()))
            x = prod if mode.startswith("sequence") else r
            w[i, t] = {"none": 1.0, "token_truncate": min(x, cap), "sequence_truncate": min(x, cap)}.get(
                mode, x if floor <= x <= cap else 0.0)
    return w


@pytest.mark.parametrize("mode", losses.ROLLOUT_IS_MODES)
def test_rollout_is_weights_match_a_direct_computation(mode):
    g = torch.Generator().manual_seed(3)
    lp = -torch.rand(5, 7, generator=g) * 3
    slp = lp + 0.6 * torch.randn(5, 7, generator=g)  # ratios well on both sides of [0.5, 2]
    mask = (torch.rand(5, 7, generator=g) < 0.75).long()
    mask[3] = 0  # a fully masked row
    mask[0, :2] = 1
    slp[mask == 0] = float("-inf")  # padding can hold anything
    lp[1, 6], mask[1, 6] = float("-inf"), 0
    w, st = losses.rollout_is_weights(lp, slp, mask, mode, cap=2.0, floor=0.5)
    want = _direct_is_weights(lp, slp, mask, mode, 2.0, 0.5)
    assert torch.isfinite(w).all() and not w.requires_grad
    torch.testing.assert_close(w.double(), want, rtol=1e-5, atol=1e-6)
    assert (w[mask == 0] == 0).all() and (w[3] == 0).all()
    keep = mask.bool()
    r = torch.exp(lp.double() - slp.double())
    raw = torch.exp(torch.where(keep, lp.double() - slp.double(), 0.0).sum(-1, keepdim=True)).expand_as(r) \
        if mode.startswith("sequence") else r
    assert st["tokens"] == int(keep.sum())
    assert st["is_mean"] == pytest.approx(float(raw[keep].mean()), rel=1e-6)
    assert st["is_max"] == pytest.approx(float(raw[keep].max()), rel=1e-6)
    changed = (raw > 2.0) if mode == "none" else ~torch.isclose(want, raw, rtol=1e-9, atol=0)
    assert st["is_clipped_frac"] == pytest.approx(float(changed[keep].float().mean()))
    assert 0 < st["is_clipped_frac"] < 1
    assert st["mismatch_kl"] == pytest.approx(float((r - r.log() - 1)[keep].mean()), rel=1e-6) and st["mismatch_kl"] > 0


def test_rollout_is_weights_errors_and_empty_mask():
    lp = torch.zeros(2, 3)
    for kw, what in ((dict(mode="tis"), "tis"), (dict(cap=0.0), "cap=0.0"), (dict(cap=-1), "cap=-1")):
        with pytest.raises(ValueError, match=what):
            losses.rollout_is_weights(lp, lp, torch.ones(2, 3), **kw)
    w, st = losses.rollout_is_weights(lp, lp - 1, torch.zeros(2, 3))
    assert (w == 0).all() and st["tokens"] == 0 and st["is_mean"] == 1.0 and st["mismatch_kl"] == 0.0


@pytest.mark.parametrize("loss_agg", ["sequence", "token", "constant"])
def test_grpo_loss_is_weights_scale_only_the_clipped_term(loss_agg):
    lp, old, ref, adv, mask = _loss_inputs()
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, loss_agg=loss_agg, max_completion_len=8)
    base, _ = losses.grpo_loss(lp, old, ref, adv, mask, beta=0.1, **kw)
    assert torch.equal(losses.grpo_loss(lp, old, ref, adv, mask, beta=0.1, is_weights=None, **kw)[0], base)
    ones, _ = losses.grpo_loss(lp, old, ref, adv, mask, beta=0.1, is_weights=torch.ones_like(lp), **kw)
    torch.testing.assert_close(ones, base, rtol=0, atol=1e-15)
    w = torch.rand(lp.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    surrogate = lambda is_w: losses.grpo_loss(lp, old, None, adv, mask, is_weights=is_w, **kw)[0]  # noqa: E731
    kl_only = losses.grpo_loss(lp, old, ref, adv * 0, mask, beta=0.1, **kw)[0]  # A = 0: only the KL term is left
    weighted, _ = losses.grpo_loss(lp, old, ref, adv, mask, beta=0.1, is_weights=w, **kw)
    torch.testing.assert_close(weighted, surrogate(w) + kl_only, rtol=1e-12, atol=1e-12)  # the KL term unweighted
    # the weighted surrogate is, token by token, the weight times the unweighted one
    ratio, a = torch.exp(lp - old), adv[:, None]
    obj = torch.min(ratio * a, ratio.clamp(0.8, 1.28) * a) * w * mask
    lens = mask.sum(-1)
    want = {"sequence": (obj.sum(-1) / lens).sum() / (lens > 0).sum(), "token": obj.sum() / lens.sum(),
            "constant": obj.sum() / (lp.shape[0] * 8)}[loss_agg]
    torch.testing.assert_close(surrogate(w), -want, rtol=1e-12, atol=1e-12)


def test_sequence_truncated_is_makes_the_expected_gradient_on_policy():
    """Exact enumeration over every sequence of 3 tokens from a 5-word vocabulary: under a behaviour distribution mu
    (a perturbed copy of the policy pi), the expected gradient of the sequence_truncate-weighted loss (cap above
    every ratio) equals the on-policy expected gradient of the unweighted loss; without the weights it does not."""
    import itertools

    g = torch.Generator().manual_seed(0)
    V, T = 5, 3
    theta = torch.randn(T, V, generator=g, dtype=torch.float64)  # pi(x) = prod_t softmax(theta_t)[x_t]
    mu_logp = torch.log_softmax(theta + 0.8 * torch.randn(T, V, generator=g, dtype=torch.float64), -1)
    reward = {x: float(torch.randn((), generator=g)) for x in itertools.product(range(V), repeat=T)}

    def loss_grad(x, behaviour_logp=None):  # the gradient of one sequence's loss, at pi_old = pi
        th = theta.clone().requires_grad_(True)
        lp = torch.log_softmax(th, -1)[torch.arange(T), list(x)][None]
        mask, adv = torch.ones(1, T), torch.tensor([reward[x]], dtype=torch.float64)
        w = None
        if behaviour_logp is not None:
            w, _ = losses.rollout_is_weights(lp.detach(), behaviour_logp[None], mask, "sequence_truncate", cap=1e9)
        loss, _ = losses.grpo_loss(lp, lp.detach(), None, adv, mask, loss_agg="token", is_weights=w)
        return torch.autograd.grad(loss, th)[0]

    def prob(logp, x):
        return float(torch.exp(logp[torch.arange(T), list(x)].sum()))

    pi_logp = torch.log_softmax(theta, -1)
    on_policy = sum(prob(pi_logp, x) * loss_grad(x) for x in reward)
    corrected = sum(prob(mu_logp, x) * loss_grad(x, mu_logp[torch.arange(T), list(x)]) for x in reward)
    uncorrected = sum(prob(mu_logp, x) * loss_grad(x) for x in reward)
    torch.testing.assert_close(corrected, on_policy, rtol=1e-9, atol=1e-12)
    assert (uncorrected - on_policy).abs().max() > 1e-2 * on_policy.abs().max()


def test_kl_k3_formula_and_nonnegative():
    g = torch.Generator().manual_seed(3)
    lp = -torch.rand(50, generator=g, dtype=torch.float64) * 5
    ref = lp + torch.randn(50, generator=g, dtype=torch.float64) * 2
    got = losses.kl_k3(lp, ref)
    want = torch.tensor([torch.exp(r - p) - (r - p) - 1 for p, r in zip(lp, ref)], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert (got >= 0).all() and (got > 0).all()
    assert (losses.kl_k3(lp, lp) == 0).all()


# -----------------------------------------------------------------------------
# group advantages


def test_group_advantages_hand_worked():
    eps = 1e-4
    r = torch.tensor([0.5, 0.5, 0.5, 0.5, 1, 0, 0, 0, 0, 1, 0.5, 0.5], dtype=torch.float64)
    got = losses.group_advantages(r, 4)
    assert (got[:4] == 0).all()  # all-equal group: exactly 0
    # [1, 0, 0, 0]: mean 0.25, Bessel std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    torch.testing.assert_close(got[4:8], torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=torch.float64) / (0.5 + eps))
    # [0, 1, 0.5, 0.5]: mean 0.5, std sqrt(0.5 / 3)
    std = (0.5 / 3) ** 0.5
    torch.testing.assert_close(got[8:], torch.tensor([-0.5, 0.5, 0, 0], dtype=torch.float64) / (std + eps))
    # batch: the same centring, divided by the std of all 12 rewards
    b = losses.group_advantages(r, 4, "batch")
    mean, n = float(r.mean()), 12
    batch_std = (sum((float(x) - mean) ** 2 for x in r) / (n - 1)) ** 0.5
    assert (b[:4] == 0).all()
    torch.testing.assert_close(b[4:8], torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=torch.float64) /
                               (batch_std + eps))
    torch.testing.assert_close(b[8:], torch.tensor([-0.5, 0.5, 0, 0], dtype=torch.float64) / (batch_std + eps))
    # none (Dr. GRPO): just centred
    n_ = losses.group_advantages(r, 4, "none")
    torch.testing.assert_close(n_, torch.tensor([0, 0, 0, 0, 0.75, -0.25, -0.25, -0.25, -0.5, 0.5, 0, 0],
                                                dtype=torch.float64))
    # every group's advantages sum to 0, whatever the scale
    for scale in ("group", "batch", "none"):
        assert losses.group_advantages(r, 4, scale).view(3, 4).sum(-1).abs().max() < 1e-12
        assert losses.group_advantages(r, 2, scale).view(6, 2).sum(-1).abs().max() < 1e-12


def test_group_advantages_exact_zero_for_awkward_equal_floats():
    r = torch.full((6,), 0.1, dtype=torch.float64)  # mean() of three 0.1s is 1 ulp off 0.1
    for scale in ("group", "batch", "none"):
        assert (losses.group_advantages(r, 3, scale) == 0).all()


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="group_size"):
        losses.group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="multiple of 4"):
        losses.group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError):
        losses.group_advantages(torch.zeros(2, 4), 4)
    with pytest.raises(ValueError, match="scale"):
        losses.group_advantages(torch.zeros(4), 4, "rank")


def test_overlong_penalty():
    assert losses.overlong_penalty(10, 16, 4) == 0.0
    assert losses.overlong_penalty(12, 16, 4) == 0.0
    assert losses.overlong_penalty(14, 16, 4) == pytest.approx(-0.5)
    assert losses.overlong_penalty(16, 16, 4) == pytest.approx(-1.0)
    assert losses.overlong_penalty(20, 16, 4) == -1.0


def test_tool_tokens_count_against_the_budget_but_not_in_completion_len_nor_the_overlong_penalty():
    """max_completion_len bounds every token; completion_len and DAPO's soft penalty count the model's own (a tool's
    output is not the model's length), and a row the budget cut is charged the whole budget, as in DAPO."""
    cfg = train_grpo.configure(["--max_completion_len=16", "--overlong=soft", "--overlong_buffer=4", "--tools=python"])
    mask = [1] * 8 + [0] * 6 + [1] * 1  # 9 of the model's tokens, 6 of a tool's: 15 in all
    finished = Completion(list(range(15)), "", [0.0] * 15, "stop", 0, [0.0] * 15, mask)
    cut = Completion(list(range(16)), "", [0.0] * 16, "length", 0, [0.0] * 16, mask + [1])
    assert finished.model_tokens == 9 and train_grpo.overlong_length(finished, cfg) == 9  # no penalty
    assert losses.overlong_penalty(train_grpo.overlong_length(cut, cfg), 16, 4) == -1.0
    rollouts = [train_grpo.Rollout(0, {}, c, 0.0, {}, None) for c in (finished, cut)]
    rec = train_grpo.rollout_metrics([rollouts], rollouts, torch.zeros(2, dtype=torch.float64), True)
    assert rec["completion_len"] == 9.5 and rec["completion_len_max"] == 10 and rec["tool_tokens"] == 6
    assert rec["truncated_frac"] == 0.5


# -----------------------------------------------------------------------------
# the CLI on a tiny random model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt")), std=0.1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    train = write_jsonl(d / "train.jsonl", [{"prompt": f"What is {a}+{b}?", "answer": str(a + b)}
                                             for a in range(6) for b in range(6)])
    test = write_jsonl(d / "test.jsonl", [{"prompt": f"What is {a}+{a + 1}?", "answer": str(2 * a + 1)}
                                           for a in range(8)])
    return train, test


def _run(ckpt, data, out, **kw):
    """train_grpo.main in-process with tiny settings; -> (result, stdout, metrics lines)."""
    args = dict(init_from=ckpt, data=data[0], eval_data=data[1], eval_every=0, max_steps=2, group_size=4,
                prompts_per_step=4, max_completion_len=16, out_dir=out, progress=0, sample_every=0, warmup_steps=1,
                lr=1e-3, rewards="language:1")
    args.update(kw)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = train_grpo.main([f"--{k}={v}" for k, v in args.items()])
    path = os.path.join(out, "metrics.jsonl")
    metrics = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
    return result, buf.getvalue(), metrics


def _params(out):
    return load_file(os.path.join(out, "ckpt", "model.safetensors"))


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def e2e(ckpt, data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("e2e"))
    return out, *_run(ckpt, data, out, eval_n=8, eval_every=2, rewards="accuracy:1,language:1")


def test_cli_end_to_end(e2e, ckpt):
    from transformers import Qwen2ForCausalLM

    out, result, stdout, metrics = e2e
    assert result["step"] == 2 and "before" in result and "after" in result
    assert 0.0 <= result["before"] <= 1.0 and 0.0 <= result["after"] <= 1.0
    assert [s for s, _ in result["history"]["accuracy"]] == [0, 2]
    assert "held-out accuracy: before" in stdout and "8 held-out problems" in stdout
    assert "reference model: none" in stdout
    # metrics: the evaluation before the first step, then one line per step with everything a run is judged by
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert set(metrics[0]) == {"step", "eval_accuracy", "eval_completion_len", "eval_format", "eval_recheck_frac"}
    assert metrics[0]["eval_accuracy"] == result["before"]
    metrics = metrics[1:]
    for m in metrics:
        missing = [k for k in REQUIRED_METRICS if k not in m]
        assert not missing, missing
        assert m["logp_mismatch"] < 1e-4  # fp32 CPU: the sampler's log-probs are the trainer's
        assert m["reward"] == pytest.approx(m["reward/accuracy"] + m["reward/language"], rel=1e-3, abs=1e-4)
        assert 0 <= m["zero_std_frac"] <= 1 and 0 <= m["truncated_frac"] <= 1
        assert 1 <= m["completion_len"] <= m["completion_len_max"] <= 16
        assert m["prompts_drawn"] == 4 and m["sampling_rounds"] == 1 and m["groups_dropped"] == 0
        # one optimizer step per rollout batch: pi_old is the policy itself, ratio exactly 1, no clipping
        assert m["clip_frac"] == 0 and m["ratio_max"] == 1 and m["kl"] == 0
        assert m["entropy"] > 0 and m["gen_tok_s"] > 0 and m["peak_mem_mb"] > 0
    assert "eval_accuracy" in metrics[-1]
    assert any(m["trained_rollouts"] > 0 for m in metrics)  # the language reward gave non-zero advantages
    # the checkpoint: HF layout, loads in transformers and in model.py, same logits; the parameters moved
    ck = os.path.join(out, "ckpt")
    ours = Transformer.from_pretrained(ck, dtype=torch.float32).eval()
    hf = Qwen2ForCausalLM.from_pretrained(ck).float().eval()
    ids = torch.tensor([[1, 5, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).float(), hf(ids).logits.float(), rtol=1e-4, atol=1e-4)
    assert _max_diff(_params(out), load_file(os.path.join(ckpt, "model.safetensors"))) > 1e-4
    state = torch.load(os.path.join(ck, "trainer_state.pt"), weights_only=False)
    assert state["step"] == 2 and state["world_size"] == 1
    assert os.path.isfile(os.path.join(ck, "tokenizer.json"))


# -----------------------------------------------------------------------------
# DDP: torchrun --nproc_per_node=2 (gloo) == one process


@pytest.fixture(scope="module")
def ddp_runs(data, tmp_path_factory):
    """The same 3 steps, minibatches=2 x ppo_epochs=2 (recomputed pi_old, real clipping), under torchrun with 2 ranks
    and in one process, in fp64: two ranks sum in another order than one process, and AdamW turns that rounding
    into steps of up to lr on a near-zero gradient, ~1e-5 apart in fp32 and by how much depends on the CPU's kernels;
    in fp64 it stays ~1e-15."""
    base = tmp_path_factory.mktemp("ddp")
    ck = make_tiny_checkpoint(str(base / "ckpt"), std=0.1, model_type="qwen3", attention_bias=False, qk_norm=True,
                              head_dim=16)
    common = dict(init_from=ck, data=data[0], eval_every=0, max_steps=3, group_size=4, prompts_per_step=4,
                  max_completion_len=16, progress=0, sample_every=0, warmup_steps=1, lr=1e-3, rewards="language:1",
                  minibatches=2, ppo_epochs=2, top_k=40,  # top-k: the rollout IS correction is on (auto)
                  dtype="float64")
    ddp_out = str(base / "ddp")
    stdout = torchrun("train_grpo.py", [f"--{k}={v}" for k, v in {**common, "out_dir": ddp_out}.items()])
    one_out = str(base / "one")
    _run(ck, data, one_out, **{k: v for k, v in common.items() if k not in ("init_from", "data")})
    return dict(ck=ck, ddp=ddp_out, one=one_out, stdout=stdout,
                m_ddp=[json.loads(line) for line in open(os.path.join(ddp_out, "metrics.jsonl"))],
                m_one=[json.loads(line) for line in open(os.path.join(one_out, "metrics.jsonl"))])


def test_ddp_two_ranks_equal_one_process(ddp_runs):
    r = ddp_runs
    assert "world 2" in r["stdout"]
    m_ddp, m_one = r["m_ddp"], r["m_one"]
    assert [m["step"] for m in m_ddp] == [m["step"] for m in m_one] == [1, 2, 3]
    for a, b in zip(m_ddp, m_one):
        # the same rollouts (seeds come from the global draw index, not the rank) and the same update
        for k in ("reward", "completion_len", "zero_std_frac", "truncated_frac", "trained_rollouts", "entropy"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
        for k in ("clip_frac", "kl", "ratio_max", "loss", "rollout_is_mean", "rollout_is_max", "rollout_is_clipped_frac",
                  "mismatch_kl"):
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-5), k
        assert a["logp_mismatch"] < 1e-4
        assert a["rollout_is_mean"] < 1 and a["mismatch_kl"] > 0  # top-k: drawn from less than the whole mass
    assert sum(m["trained_rollouts"] for m in m_one) > 0
    assert any(m["clip_frac"] > 0 for m in m_one)  # recomputed pi_old: the second pass really clips
    init = load_file(os.path.join(r["ck"], "model.safetensors"))
    a, b = _params(r["ddp"]), _params(r["one"])
    assert _max_diff(a, init) > 1e-3  # the parameters moved...
    assert _max_diff(a, b) <= 1e-10  # ...the same way


def test_bf16_rollouts_on_the_cpu_log_the_mismatch_and_turn_the_correction_on(ckpt, data, tmp_path):
    _, out, m = _run(ckpt, data, str(tmp_path / "bf16"), sample_dtype="bfloat16", dtype="bfloat16",
                     rewards="accuracy:1,language:1")
    assert "torch.bfloat16 rollouts" in out and "rollout IS correction: token_truncate" in out
    for r in m:
        assert all(k in r for k in REQUIRED_METRICS)
        assert r["logp_mismatch"] > 1e-3 and r["mismatch_kl"] > 0 and r["rollout_is_max"] > 1
        assert 0 <= r["rollout_is_clipped_frac"] < 1
    _, out, m = _run(ckpt, data, str(tmp_path / "fp32"))  # the CPU default: one distribution, no correction
    assert "rollout IS correction: none" in out
    assert all(r["rollout_is_mean"] == pytest.approx(1, abs=1e-4) and r["mismatch_kl"] < 1e-6 for r in m)
    _, out, _ = _run(ckpt, data, str(tmp_path / "off"), sample_dtype="bfloat16", rollout_is="none")
    assert "rollout IS correction: none" in out  # an explicit mode is kept


def test_ddp_logs_global_generated_tokens(ddp_runs):
    for a, b in zip(ddp_runs["m_ddp"], ddp_runs["m_one"]):
        assert a["gen_tokens"] == b["gen_tokens"]


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, dtype="float32")).init_weights(0.1)


def _rollout(tokens, adv=0.0, logprobs=None, loss_mask=None, in_loss=True, prompt=(5, 6, 7)):
    """A scored rollout as policy_update takes it (a tasks.Rollout around an engine.Completion)."""
    n = len(tokens)
    completion = Completion(list(tokens), "", logprobs or [0.0] * n, "stop", 0, logprobs or [0.0] * n,
                        loss_mask or [1] * n, [])
    item = {"ids": list(prompt), "row": {}, "where": "test"}
    return train_grpo.Rollout(0, item, completion, 0.0, {}, None, adv, in_loss)


def test_ddp_path_with_a_flat_minibatch_equals_one_process(tmp_path):
    """The DDP code path of policy_update on a world of 1 (all_reduce is then the identity) against the plain
    path, over an update with non-zero advantages followed by two whose advantages are all 0 (every group flat:
    common early in R1-Zero, when nothing is solved)."""
    import copy

    import torch.distributed as dist

    cfg = train_grpo.configure(["--group_size=2", "--max_completion_len=4"])
    g = torch.Generator().manual_seed(0)

    def rollouts(adv):
        return [_rollout(torch.randint(3, 60, (3,), generator=g).tolist(), a) for a in adv]

    steps = [rollouts([1.0, -1.0, 0.5, -0.5]), rollouts([0.0] * 4), rollouts([0.0] * 4)]
    base = _tiny_model().double()

    def run(ddp):
        model = copy.deepcopy(base)
        opt = make_optimizer(model, 1e-2, 0.0, (0.9, 0.99))
        rt = Runtime(ddp, 0, 0, 1, torch.device("cpu"), "cpu", None)
        for step, r in enumerate(steps):
            train_grpo.policy_update(model, None, opt, r, cfg, rt, 0, step)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    plain = run(False)
    assert _max_diff(plain, base.state_dict()) > 0
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = run(True)
    finally:
        dist.destroy_process_group()
    assert _max_diff(plain, ddp) <= 1e-10


def test_token_budget_micro_batches_give_the_same_update():
    """Ragged rollouts packed longest first under a token budget (several micro-batches, one rollout alone past the
    budget) update the policy exactly as one micro-batch per rollout does: the normaliser is the minibatch's. In
    fp64, where the other summation order of each cut moves the AdamW step by ~1e-15 (in fp32 by up to ~1e-5 at
    lr 1e-2, by an amount that depends on the CPU's kernels)."""
    g = torch.Generator().manual_seed(1)
    rollouts = [_rollout(torch.randint(3, 60, (int(n),), generator=g).tolist(), float(a), prompt=list(range(5, 5 + p)))
                for n, a, p in zip([3, 17, 9, 2, 30, 12, 5, 8], [1.0, -1.0, 0.5, -0.5, 0.7, -0.7, 0.2, -0.2],
                                   [3, 5, 2, 4, 3, 6, 3, 2])]
    results = {}
    for name, flags in (("one each", ["--micro_batch_tokens=0", "--micro_batch_size=1"]),
                        ("budget", ["--micro_batch_tokens=40"]), ("count", ["--micro_batch_tokens=0"])):
        cfg = train_grpo.configure(["--group_size=2", "--max_completion_len=32", "--loss_agg=token", *flags])
        model = _tiny_model().double()
        opt = make_optimizer(model, 1e-2, 0.0, (0.9, 0.99))
        stats = train_grpo.policy_update(model, None, opt, rollouts, cfg, Runtime(False, 0, 0, 1, torch.device("cpu"),
                                                                                    "cpu", None), 0, 0)
        results[name] = stats, {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert _max_diff(results["one each"][1], _tiny_model().double().state_dict()) > 1e-3  # it moved
    assert _max_diff(results["budget"][1], results["one each"][1]) <= 1e-10
    assert _max_diff(results["count"][1], results["one each"][1]) <= 1e-10
    one, budget, count = (results[k][0] for k in ("one each", "budget", "count"))
    assert (one["micro_batches"], one["pad_frac"]) == (8, 0.0)
    assert count["micro_batches"] == 1 and count["pad_frac"] > 0.4  # all eight padded to the longest (33 tokens)
    assert 1 < budget["micro_batches"] < 8 and budget["pad_frac"] < count["pad_frac"]


def test_packing_and_rank_shares():
    cfg = train_grpo.configure(["--micro_batch_tokens=100"])
    lengths = [10, 60, 25, 25, 120, 30, 5, 50]
    batches = train_grpo.split_micro_batches(list(range(8)), lengths, cfg)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert batches[0] == [4]  # longer than the budget: alone
    for b in batches:
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
        assert len(b) * lengths[b[0]] <= 100 or len(b) == 1
    shares = train_grpo.rank_shares(list(range(8)), lengths, 3, cfg)
    loads = [sum(lengths[i] for i in s) for s in shares]
    assert sorted(i for s in shares for i in s) == list(range(8)) and max(loads) - min(loads) <= max(lengths)
    assert train_grpo.rank_shares(list(range(8)), lengths, 3, train_grpo.configure(["--micro_batch_tokens=0"])) == \
        [[0, 3, 6], [1, 4, 7], [2, 5]]  # without a budget: as before, k % world


def test_fsdp_ranks_run_as_many_micro_batches_as_the_busiest():
    """Under FSDP every forward and backward is collective: a rank with fewer micro-batches runs padding passes (the
    fill rollouts, zero weight) until the busiest rank is done. Without FSDP each rank runs its own."""
    lengths = [120, 10, 10, 10, 10, 10]
    shares = [[0], [1, 2, 3, 4, 5]]  # one long rollout against five short ones
    for fsdp in (0, 1):
        cfg = train_grpo.configure(["--micro_batch_tokens=20", f"--fsdp={fsdp}"])
        runs = [list(train_grpo.micro_batches(shares, rank, lengths, [9], cfg)) for rank in (0, 1)]
        assert [idx for idx, pad in runs[1] if not pad] == [[1, 2], [3, 4], [5]]
        assert runs[0][0] == ([0], False)
        assert runs[0][1:] == ([([9], True)] * 2 if fsdp else [])


def test_rollouts_out_of_the_loss_are_not_run():
    """A truncated rollout that overlong=mask took out of the loss runs no forward/backward, even with a non-zero
    advantage: the update is the one where that rollout's advantage is 0 (a skipped rollout), also with beta > 0."""
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(3, 60, (3,), generator=g).tolist() for _ in range(4)]

    def update(masked_adv, beta):
        cfg = train_grpo.configure(["--group_size=2", "--max_completion_len=4", f"--beta={beta}"])
        rollouts = [_rollout(t, a, in_loss=bool(m)) for t, m, a in zip(tokens, (1, 1, 0, 1), (1.0, -1.0, masked_adv, -0.5))]
        model = _tiny_model()
        ref = _tiny_model() if beta else None
        opt = make_optimizer(model, 1e-2, 0.0, (0.9, 0.99))
        rt = Runtime(False, 0, 0, 1, torch.device("cpu"), "cpu", None)
        stats = train_grpo.policy_update(model, ref, opt, rollouts, cfg, rt, 0, 0)
        return stats["trained_rollouts"], {k: v.detach().clone() for k, v in model.state_dict().items()}

    for beta in (0.0, 0.1):
        n, params = update(0.5, beta)
        _, params_zero_adv = update(0.0, beta)
        assert n == 3
        assert _max_diff(params, params_zero_adv) == 0


def test_logp_mismatch_is_the_largest_gap_over_the_sampled_tokens():
    """Completions of 2 and 4 tokens: the trainer's log-probs (0 past each end, as completion_logprobs returns them)
    against the sampler's; the largest |gap| of a token the model sampled, whatever its sign (a tool's tokens carry
    sampler log-prob 0 and do not count); 0 for no rollout."""
    rollouts = [_rollout([8, 9], logprobs=[-1.0, -2.0]), _rollout([8, 9, 10, 11], logprobs=[-1.0, -1.0, 0.0, -1.0],
                                                                  loss_mask=[1, 1, 0, 1])]
    lp = torch.tensor([[-1.25, -2.0, 0.0, 0.0], [-1.0, -0.5, -3.0, -1.0]])
    assert train_grpo.logp_mismatch(lp, rollouts, [0, 1], "cpu") == 0.5  # rollout 1, token 1: |-0.5 - (-1)|
    assert train_grpo.logp_mismatch(lp[:1, :2], rollouts, [0], "cpu") == 0.25
    assert train_grpo.logp_mismatch(torch.zeros(0, 0), rollouts, [], "cpu") == 0.0


def _ragged_logprobs(temperature):
    """completion_logprobs of two completions of lengths 2 and 4 (row 0 is padded by 2), tiny random model."""
    rows = [([5, 6, 7], [8, 9]), ([5, 6], [8, 9, 10, 11])]
    return losses.completion_logprobs(_tiny_model(), rows, 0, 1024, temperature, "cpu")


def test_completion_logprobs_match_one_row_at_a_time():
    lp = _ragged_logprobs(1.0)
    assert lp.shape == (2, 4) and (lp[0, :2] < 0).all() and (lp[1] < 0).all()
    model = _tiny_model()
    for b, (p, c) in enumerate([([5, 6, 7], [8, 9]), ([5, 6], [8, 9, 10, 11])]):
        with torch.no_grad():
            logits = model(torch.tensor([p + c]))[0, len(p) - 1:-1].float()
        want = logits.log_softmax(-1).gather(1, torch.tensor(c)[:, None])[:, 0]
        torch.testing.assert_close(lp[b, :len(c)].detach(), want, rtol=1e-5, atol=1e-5)


def test_completion_logprobs_are_zero_past_a_rows_end():
    lp = _ragged_logprobs(1.0)
    assert (lp[0, 2:] == 0).all()


def test_beta_loss_is_finite_on_a_ragged_batch():
    lp = _ragged_logprobs(0.005)  # a very low temperature: as peaked as a trained model can be
    assert lp[1].min() < -88.7  # log-probs below log(fp32 tiny): exp(-lp) overflows
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    ref = lp.detach().clone()
    ref[0, 2:] = 0  # what policy_update builds past a row's end
    loss, stats = losses.grpo_loss(lp, lp.detach(), ref, torch.tensor([1.0, -1.0]), mask, beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and stats["kl"] == 0


# -----------------------------------------------------------------------------
# exact resume


def test_kill_and_resume_reaches_the_same_parameters(ckpt, data, tmp_path):
    kw = dict(max_steps=4, save_every=1, minibatches=2, eval_every=2, eval_n=4)
    full, _, m_full = _run(ckpt, data, str(tmp_path / "full"), **kw)
    crashed, out, _ = _run(ckpt, data, str(tmp_path / "resumed"), stop_after=2, **kw)
    assert crashed["step"] == 2 and "stopping after step 2" in out and "before" not in crashed
    resumed, out, m_res = _run(ckpt, data, str(tmp_path / "resumed"), resume=1, **kw)
    assert resumed["step"] == 4 and "resumed from" in out and "at step 2" in out
    a, b = _params(tmp_path / "full"), _params(tmp_path / "resumed")
    assert _max_diff(a, load_file(os.path.join(ckpt, "model.safetensors"))) > 1e-4
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full["history"] == resumed["history"] and full["after"] == resumed["after"]
    assert [m["step"] for m in m_res] == [m["step"] for m in m_full] == [0, 1, 2, 3, 4]  # no step twice
    assert sum(m.get("trained_rollouts", 0) for m in m_full) > 0  # (line 0 is the first evaluation)
    skip = ("time_gen", "time_logp", "time_update", "time_step", "gen_tok_s", "peak_mem_mb", "mfu")
    for x, y in zip(m_full, m_res):
        assert {k: v for k, v in x.items() if k not in skip} == {k: v for k, v in y.items() if k not in skip}
    sa = torch.load(tmp_path / "full" / "ckpt" / "trainer_state.pt", weights_only=False)
    sb = torch.load(tmp_path / "resumed" / "ckpt" / "trainer_state.pt", weights_only=False)
    assert sa["step"] == sb["step"] == 4 and sa["data"] == sb["data"]


# -----------------------------------------------------------------------------
# the reference model


def test_resume_restores_a_moving_reference(ckpt, data, tmp_path):
    """--ref_update_every: the reference moves with the policy, so it is part of the checkpoint and of the resume."""
    kw = dict(max_steps=3, save_every=1, beta=0.1, ref_update_every=2, eval_every=0)
    _run(ckpt, data, str(tmp_path / "full"), **kw)
    _run(ckpt, data, str(tmp_path / "resumed"), stop_after=2, **kw)  # dies after the reference moved at step 2
    _run(ckpt, data, str(tmp_path / "resumed"), resume=1, **kw)
    a, b = _params(tmp_path / "full"), _params(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ref = [torch.load(tmp_path / d / "ckpt" / "trainer_state.pt", weights_only=False)["ref"] for d in ("full", "resumed")]
    init = load_file(os.path.join(ckpt, "model.safetensors"))
    assert any(not torch.equal(ref[0][k], init[k]) for k in init if k in ref[0])  # it moved
    assert all(torch.equal(ref[0][k], ref[1][k]) for k in ref[0])


def test_reference_model_only_with_beta(ckpt, data, tmp_path, monkeypatch):
    loads = []
    original = Transformer.from_pretrained
    monkeypatch.setattr(Transformer, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a[0]) or original(*a, **k)))
    _, out, _ = _run(ckpt, data, str(tmp_path / "b0"), beta=0.0)
    assert len(loads) == 1 and "reference model: none" in out
    loads.clear()
    _, out, metrics = _run(ckpt, data, str(tmp_path / "b1"), beta=0.1)
    assert len(loads) == 2 and "reference model: yes" in out
    assert metrics[0]["kl"] < 1e-6  # step 1: policy == reference
    assert metrics[1]["kl"] > 1e-6  # step 2: the policy has moved away from it
    assert metrics[1]["loss"] != 0  # the k3 term is in the loss: rollouts with zero advantage are trained too
    assert all(m["trained_rollouts"] == 16 for m in metrics)


# -----------------------------------------------------------------------------
# dynamic sampling (DAPO)


def test_dynamic_sampling_refills_the_batch(ckpt, data, tmp_path):
    # one-token completions at a low temperature: the language reward (0 or 1) ties within many groups
    kw = dict(max_completion_len=1, temperature=0.5, max_steps=3)
    _, _, plain = _run(ckpt, data, str(tmp_path / "plain"), **kw)
    _, _, dyn = _run(ckpt, data, str(tmp_path / "dyn"), dynamic_sampling=1, max_sampling_rounds=4, **kw)
    assert any(m["zero_std_frac"] > 0 for m in plain)
    assert any(m["groups_dropped"] > 0 for m in dyn)
    # the first round of step 1 draws the same prompts with the same seeds: it drops exactly the flat groups
    assert dyn[0]["groups_dropped"] >= round(plain[0]["zero_std_frac"] * 4)
    for m in dyn:
        assert m["prompts_drawn"] >= 4 and m["prompts_drawn"] - m["groups_dropped"] <= 4
        if m["groups_dropped"] > 0:
            assert m["sampling_rounds"] > 1
        if m["sampling_rounds"] < 4:  # stopped early: the batch was full
            assert m["prompts_drawn"] - m["groups_dropped"] == 4
        if m["prompts_drawn"] > m["groups_dropped"]:
            assert m["zero_std_frac"] == 0  # every kept group carries signal
            assert 0 < m["trained_rollouts"] <= 4 * (m["prompts_drawn"] - m["groups_dropped"])


# -----------------------------------------------------------------------------
# bad input: a clear error naming the flag or file:line


def test_bad_flags(ckpt, data, tmp_path):
    with pytest.raises(SystemExit, match="bogus"):
        _run(ckpt, data, str(tmp_path / "x"), rewards="bogus:1")
    with pytest.raises(SystemExit, match="group_size"):
        _run(ckpt, data, str(tmp_path / "x"), group_size=1)
    with pytest.raises(SystemExit, match="loss_agg"):
        train_grpo.configure(["--loss_agg=mean"])
    with pytest.raises(SystemExit, match="minibatches"):
        train_grpo.configure(["--minibatches=0"])
    with pytest.raises(SystemExit, match="overlong_buffer"):
        train_grpo.configure(["--overlong=soft", "--overlong_buffer=64", "--max_completion_len=32"])
    with pytest.raises(SystemExit, match="init_from"):
        _run(str(tmp_path), data, str(tmp_path / "x"))


def test_bad_data_files(ckpt, data, tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(SystemExit, match="empty.jsonl"):
        _run(ckpt, (empty, data[1]), str(tmp_path / "x"))
    rows = [{"prompt": "What is 1+1?", "answer": "2"}, {"prompt": "What is 2+2?"}]
    no_answer = write_jsonl(tmp_path / "no_answer.jsonl", rows)
    with pytest.raises(SystemExit, match=r"no_answer\.jsonl:2.*'answer'"):
        _run(ckpt, (no_answer, data[1]), str(tmp_path / "x"), rewards="accuracy")
    no_prompt = write_jsonl(tmp_path / "no_prompt.jsonl", [{"prompt": "hi"}, {"question": "x"}])
    with pytest.raises(SystemExit, match=r"no_prompt\.jsonl:2.*'prompt'"):
        _run(ckpt, (no_prompt, data[1]), str(tmp_path / "x"))


# -----------------------------------------------------------------------------
# recipes, the plot


def test_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "recipe.py"
    recipe.write_text("# a recipe\nlr = 0.1\ngroup_size = 4\nloss_agg = 'token'\n")
    cfg = train_grpo.configure([str(recipe), "--lr=0.5"])
    assert cfg.lr == 0.5 and cfg.group_size == 4 and cfg.loss_agg == "token"
    assert train_grpo.configure(["--lr=0.5", str(recipe)]).lr == 0.1  # applied in order
    bad = tmp_path / "bad.py"
    bad.write_text("lr = 0.1\nlr = foo()\n")
    with pytest.raises(SystemExit, match=f"{bad}:2"):
        train_grpo.configure([str(bad)])
    unknown = tmp_path / "unknown.py"
    unknown.write_text("group_sizee = 4\n")
    with pytest.raises(SystemExit, match=f"{unknown}:1.*group_sizee"):
        train_grpo.configure([str(unknown)])
    small = tmp_path / "small.py"
    small.write_text("group_size = 1\n")
    with pytest.raises(SystemExit, match="group_size"):  # a recipe's values are checked like flags
        train_grpo.configure([str(small)])


def test_shipped_recipes_are_valid():
    recipes = sorted(glob.glob(os.path.join(ROOT, "config", "*.py")))
    assert recipes, "no config/*.py recipes"
    import distill
    for path in recipes:
        if "distill" in os.path.basename(path):  # distill.py's recipes: its own options
            assert distill.configure([path]).mode in distill.MODES, path
            continue
        cfg = train_grpo.configure([path])
        assert cfg.group_size >= 2 and cfg.loss_agg in ("sequence", "token", "constant"), path


def test_ascii_plot():
    lines = train_grpo.ascii_plot({"acc": [(0, 0.0), (10, 1.0)], "reward": [(5, 0.5)]}, width=20, height=5)
    assert isinstance(lines, list) and all(isinstance(s, str) for s in lines)
    grid = lines[:5]
    assert grid[0].startswith(" 1.0 |") and grid[-1].startswith(" 0.0 |")
    assert all(len(s) == len(" 1.0 |") + 20 for s in grid)
    assert grid[0].endswith("a") and grid[-1][6] == "a"  # (10, 1.0) top right, (0, 0.0) bottom left
    assert grid[2][6 + 10] == "r"  # (5, 0.5): the middle
    assert sum(s.count("a") for s in grid) == 2 and sum(s.count("r") for s in grid) == 1
    assert "step 0" in lines[-2] and "step 10" in lines[-2]
    assert "a = acc" in lines[-1] and "r = reward" in lines[-1]
    assert train_grpo.ascii_plot({}) == [] and train_grpo.ascii_plot({"a": []}) == []
    clipped = train_grpo.ascii_plot({"x": [(1, 7.0), (2, -3.0)]}, width=10, height=4)
    assert clipped[0].endswith("x" + " " * 9) and clipped[3].endswith("x")  # values outside [0, 1] clamp
