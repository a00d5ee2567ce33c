"""
Every training formula of nanoR1, each beside the paper (and equation) it comes from; only torch, nothing of the repo.
  chunked over positions: chunked_cross_entropy (SFT), chunked_token_logprobs (GRPO; completion_logprobs runs a model
      into it), chunked_forward_kl (logit distillation). Logits for 8k tokens x 151936 words in fp32 are 4.9 GB: these
      take the final hidden states [N, D] and the lm_head weight [V, D] and hold one [chunk, V] block at a time.
  GRPO: group_advantages, kl_k3, grpo_loss (GRPO / DAPO / Dr. GRPO / GSPO), rollout_is_weights, overlong_penalty
  distillation: reverse_kl_loss (on-policy); reward model: bradley_terry_loss
"""
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# losses over a big vocabulary, in chunks of positions


class _GradInForward(torch.autograd.Function):
    """A loss of (hidden, weight, ...) whose forward pass also makes its gradients, one chunk of logits at a time, and
    saves them: backward only scales them by the incoming gradient (no logits kept, none recomputed)."""

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        rest = (None,) * (len(ctx.needs_input_grad) - 2)  # the other inputs take no gradient
        return (grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype)) + rest


class _ChunkedCE(_GradInForward):
    """Sum of token cross-entropies; the gradient is computed chunk by chunk in the forward pass, where
    softmax - onehot is known."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, ignore_index):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]  # grad mode is off inside forward()
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 logits for bf16 models, fp64 stays fp64
        loss = torch.zeros((), device=hidden.device, dtype=acc)
        grad_h = torch.empty_like(hidden) if need_grad else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_grad else None
        for s in range(0, hidden.shape[0], chunk_size):
            h, y = hidden[s:s + chunk_size], targets[s:s + chunk_size]
            keep = y != ignore_index
            y_safe = y.clamp(min=0)
            logits = (h @ weight.t()).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            loss += ((lse - logits.gather(1, y_safe[:, None]).squeeze(1)) * keep).sum()
            if need_grad:
                g = torch.softmax(logits, dim=-1)  # d(lse - logit_y)/dlogits = softmax - onehot
                g[torch.arange(len(y), device=y.device), y_safe] -= 1.0
                g *= keep[:, None]
                grad_h[s:s + chunk_size] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
                grad_w += g.t() @ h.to(acc)
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss


def chunked_cross_entropy(hidden, weight, targets, chunk_size=1024, ignore_index=-100, reduction="mean"):
    """Cross-entropy of lm_head(hidden) against targets, never materialising [N, V] logits.
    hidden [..., D], targets [...] (ignore_index = masked). reduction 'mean' (over kept tokens) or 'sum'."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    loss = _ChunkedCE.apply(hidden, weight, targets, chunk_size, ignore_index)
    if reduction == "sum":
        return loss
    return loss / (targets != ignore_index).sum().clamp(min=1)


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T / temperature) at the targets, chunk by chunk. Forward keeps only each
    position's logsumexp; backward recomputes one chunk of logits at a time and turns it in place into the gradient
    g * (onehot - softmax) / temperature: one [chunk, V] buffer, no second logsumexp, no scatter of a one-hot."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, temperature):
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 logits for bf16 models, fp64 stays fp64
        out = torch.empty(hidden.shape[0], device=hidden.device, dtype=acc)
        lse = torch.empty_like(out)
        buf = _logits_buffer(hidden, weight, chunk_size, acc)
        for s in range(0, hidden.shape[0], chunk_size):
            x = _chunk_logits(hidden[s:s + chunk_size], weight, temperature, buf)
            picked = x.gather(1, targets[s:s + chunk_size, None])[:, 0]
            top = x.amax(-1)  # logsumexp in place: the buffer is not needed after this
            lse[s:s + chunk_size] = x.sub_(top[:, None]).exp_().sum(-1).log_().add_(top)
            out[s:s + chunk_size] = picked - lse[s:s + chunk_size]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk_size, temperature = ctx.chunk_size, ctx.temperature
        acc = lse.dtype
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=acc) if ctx.needs_input_grad[1] else None
        buf = _logits_buffer(hidden, weight, chunk_size, acc)
        for s in range(0, hidden.shape[0], chunk_size):
            h, y, g = hidden[s:s + chunk_size], targets[s:s + chunk_size], grad_out[s:s + chunk_size].to(acc)
            x = _chunk_logits(h, weight, temperature, buf)
            x.sub_(lse[s:s + chunk_size, None]).exp_().mul_(-g[:, None])  # -g * softmax
            x[torch.arange(len(y), device=y.device), y] += g  # + g * onehot
            if temperature != 1:
                x.div_(temperature)  # d(logits / T) / d logits
            if grad_h is not None:
                grad_h[s:s + chunk_size] = (x.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_w is not None:
                grad_w.addmm_(x.t(), h.to(acc))
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


def _logits_buffer(hidden, weight, chunk_size, acc):
    """One [chunk, V] buffer reused by every chunk of a call: on the CPU a fresh one per chunk is handed back to
    the OS by malloc and page-faulted in again (about a third of the time at a 151936-word vocabulary)."""
    return torch.empty(min(chunk_size, hidden.shape[0]), weight.shape[0], device=hidden.device, dtype=acc)


def _chunk_logits(h, weight, temperature, buf):
    x = buf[:h.shape[0]]
    if h.dtype == weight.dtype == x.dtype:
        torch.matmul(h, weight.t(), out=x)
    else:  # bf16 matmul, fp32 logits
        x.copy_(h @ weight.t())
    if temperature != 1:  # not x / 1.0: a full pass over [chunk, vocab]
        x.div_(temperature)
    return x


def chunked_token_logprobs(hidden, weight, targets, chunk_size=1024, temperature=1.0):
    """log p(targets) under lm_head(hidden)/temperature, in fp32, shape of targets. Differentiable with any
    upstream gradient (GRPO weights tokens by advantages); logits are never stored, only recomputed one chunk at
    a time in backward (see _TokenLogprobs)."""
    shape = targets.shape
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).clamp(min=0)
    return _TokenLogprobs.apply(hidden, weight, targets, chunk_size, temperature).view(shape)


class _ForwardKL(_GradInForward):
    """Sum over positions of T^2 KL(p_teacher || p_student), p = softmax(logits / T): logit distillation's loss
    (Hinton et al. 2015, "Distilling the knowledge in a neural network"; the T^2 keeps the gradient's size the same
    as T changes). topk > 0: the teacher's distribution cut to its k likeliest words and renormalised over them (the
    student's stays over the whole vocabulary), so only [N, k] of the teacher matters. The gradient is made in the
    forward pass, where both softmaxes are at hand: d(T^2 KL)/d student logits = T (q - p)."""

    @staticmethod
    def forward(ctx, hidden, weight, t_hidden, t_weight, chunk_size, temperature, topk):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        acc = torch.promote_types(hidden.dtype, torch.float32)
        T = float(temperature)
        loss = torch.zeros((), device=hidden.device, dtype=acc)
        grad_h = torch.empty_like(hidden) if need_grad else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_grad else None
        for s in range(0, hidden.shape[0], chunk_size):
            h = hidden[s:s + chunk_size]
            log_q = torch.log_softmax((h @ weight.t()).to(acc) / T, dim=-1)
            t_logits = (t_hidden[s:s + chunk_size] @ t_weight.t()).to(acc) / T
            if topk:
                top, idx = t_logits.topk(topk, dim=-1)
                log_p = torch.log_softmax(top, dim=-1)
                loss += T * T * (log_p.exp() * (log_p - log_q.gather(1, idx))).sum()
                p = torch.zeros_like(log_q).scatter_(1, idx, log_p.exp())
            else:
                log_p = torch.log_softmax(t_logits, dim=-1)
                p = log_p.exp()
                loss += T * T * (p * (log_p - log_q)).sum()
            if need_grad:
                g = (log_q.exp_() - p).mul_(T)
                grad_h[s:s + chunk_size] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
                grad_w += g.t() @ h.to(acc)
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss


def chunked_forward_kl(hidden, weight, teacher_hidden, teacher_weight, chunk_size=1024, temperature=1.0, topk=0):
    """Summed T^2 KL(teacher || student) of the next-token distributions at N positions (see _ForwardKL), never
    holding more than one [chunk, V] block of either model's logits. hidden [..., D] / weight [V, D]: the student's
    final hidden states and lm_head (differentiable); teacher_hidden [..., Dt] / teacher_weight [V, Dt]: the
    teacher's (no gradient), on the same device. Both heads must cover the same V words (same tokenizer)."""
    if weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student head has {weight.shape[0]} words, teacher head {teacher_weight.shape[0]}: "
                         "logit distillation needs one vocabulary")
    hidden, teacher_hidden = hidden.reshape(-1, hidden.shape[-1]), teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    return _ForwardKL.apply(hidden, weight, teacher_hidden.detach(), teacher_weight.detach(), chunk_size,
                            temperature, topk)


def completion_logprobs(model, rows, pad_id, chunk, temperature, device):
    """Per-token log-probs of each row's completion given its prompt. rows: (prompt ids, completion ids) pairs.
    -> [B, Tc] in at least fp32 (0 past a row's end). The batch is right-padded and needs no attention mask: under
    causal attention padding after a row's tokens never reaches them (a 2-D mask would take the slower masked path).
    Only completion positions go through the lm_head, in chunks: never a [B, T, vocab] tensor."""
    B = len(rows)
    T = max(len(p) + len(c) for p, c in rows)
    Tc = max(len(c) for _, c in rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.zeros((B, Tc), dtype=torch.long)
    pos = torch.zeros((B, Tc), dtype=torch.long)
    for b, (p, c) in enumerate(rows):
        ids[b, :len(p) + len(c)] = torch.tensor(list(p) + list(c))
        targets[b, :len(c)] = torch.tensor(c)
        pos[b] = (len(p) - 1 + torch.arange(Tc)).clamp(max=T - 1)  # position t predicts completion token t
    ids, targets, pos = ids.to(device), targets.to(device), pos.to(device)
    hidden = model(ids, return_hidden=True)
    h = hidden.gather(1, pos[..., None].expand(B, Tc, hidden.shape[-1]))
    past_end = torch.arange(Tc, device=device)[None] >= torch.tensor([len(c) for _, c in rows], device=device)[:, None]
    return chunked_token_logprobs(h, model.lm_head.weight, targets, chunk, temperature).masked_fill(past_end, 0.0)


# -----------------------------------------------------------------------------
# GRPO: advantages, KL estimator, clipped surrogate, overlong shaping


def group_advantages(rewards, group_size, scale="group", eps=1e-4):
    """Group-relative advantages, one per completion. rewards: 1-D, prompt-major (rows i*G .. i*G+G-1 are
    prompt i's group).
    group: (r - group mean) / (group std + eps)   -- GRPO, DeepSeekMath eq. 3 (outcome supervision)
    batch: (r - group mean) / (batch std + eps)   -- std over every reward of the batch
    none:  r - group mean                         -- Dr. GRPO (arXiv 2503.20783, sec. 3.1): no std division
    std with Bessel's correction. A group whose rewards are all equal gets exactly 0 (it carries no signal)."""
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: need at least 2 samples per group")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)}: expected 1-D with a multiple of {group_size} "
                         "entries")
    r = rewards.view(-1, group_size)
    centered = r - r.mean(-1, keepdim=True)
    if scale == "group":
        centered = centered / (r.std(-1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (rewards.std() + eps)
    elif scale != "none":
        raise ValueError(f"scale={scale!r}: expected group, batch or none")
    flat = (r == r[:, :1]).all(-1, keepdim=True)  # mean() of equal floats can be 1 ulp off: force exact zeros
    return torch.where(flat, torch.zeros_like(centered), centered).reshape(-1)


def kl_k3(logprobs, ref_logprobs):
    """Per-token k3 estimate of KL(pi_theta || pi_ref): pi_ref/pi_theta - log(pi_ref/pi_theta) - 1, unbiased and
    >= 0 (DeepSeekMath eq. 4; Schulman, "Approximating KL divergence")."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


LOSS_AGGS = ("sequence", "token", "constant")  # GRPO, DAPO, Dr. GRPO: what grpo_loss sums and divides by


def _check_loss_agg(loss_agg, max_completion_len):
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg={loss_agg!r}: expected one of {', '.join(LOSS_AGGS)}")
    if loss_agg == "constant" and not max_completion_len:
        raise ValueError("loss_agg='constant' needs max_completion_len")


def loss_normalizer(lens, loss_agg, max_completion_len=None):
    """What grpo_loss divides the summed objective by, from each row's count of masked tokens `lens` (a list or a
    tensor), at least 1: sequence (GRPO): rows with any masked token; token (DAPO, arXiv 2503.14476 eq. 12): masked
    tokens; constant (Dr. GRPO, arXiv 2503.20783): rows x max_completion_len."""
    _check_loss_agg(loss_agg, max_completion_len)
    lens = torch.as_tensor(lens).double()  # counts past 256 stay exact even when lens came in bf16
    if loss_agg == "sequence":
        count = (lens > 0).sum()
    elif loss_agg == "token":
        count = lens.sum()
    else:
        count = len(lens) * max_completion_len
    return max(float(count), 1.0)


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_eps_low=0.2, clip_eps_high=0.2, beta=0.0,
              loss_agg="sequence", importance_sampling="token", max_completion_len=None, normalizer=None,
              is_weights=None):
    """The clipped GRPO surrogate, negated (a loss to minimise), and stats.

    logprobs, old_logprobs, ref_logprobs (None when beta == 0), mask: [B, T]; advantages: [B].
    ratio, importance_sampling="token" (GRPO, DeepSeekMath eq. 3):  rho_t = exp(lp_t - old_t)
           importance_sampling="sequence" (GSPO, arXiv 2507.18071 eq. 7): rho = exp(sum_t m_t (lp_t - old_t) / |o|),
           one ratio per completion, broadcast to its tokens
    objective per token: min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) - beta k3   (DAPO's clip-higher:
           eps_high > eps_low, arXiv 2503.14476 eq. 10)
    loss = -(sum of the objective over mask) / loss_normalizer(...), aggregated by loss_agg:
      sequence (GRPO):     each row's token mean, summed over rows
      token (DAPO eq. 12), constant (Dr. GRPO): summed over every token
    normalizer: divide by this instead of the batch's own loss_normalizer, so micro-batches and ranks that each pass
    the global one sum to exactly the one-batch gradient.
    is_weights [B, T] (rollout_is_weights): each token's clipped term times its weight, for rollouts drawn from
    another distribution than pi_old; the KL term, the aggregation and the normaliser stay as they are.
    stats (floats): clip_frac_low / clip_frac_high / clip_frac (fraction of masked tokens whose clip is active),
    kl (token mean of k3 to the reference, or to pi_old without one), ratio_max, tokens."""
    _check_loss_agg(loss_agg, max_completion_len)  # before any compute, also when the caller passes normalizer
    keep = mask.bool()  # values past a row's end can be anything (even -inf): zero them before exp()
    logprobs, old_logprobs = logprobs.masked_fill(~keep, 0.0), old_logprobs.masked_fill(~keep, 0.0)
    ref_logprobs = None if ref_logprobs is None else ref_logprobs.masked_fill(~keep, 0.0)
    mask = mask.to(logprobs.dtype)
    lens = mask.sum(-1)
    log_ratio = logprobs - old_logprobs
    if importance_sampling == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / lens.clamp(min=1))[:, None].expand_as(logprobs)
    elif importance_sampling != "token":
        raise ValueError(f"importance_sampling={importance_sampling!r}: expected token or sequence")
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logprobs.dtype)[:, None]
    objective = torch.min(ratio * adv, ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high) * adv)
    if is_weights is not None:
        objective = objective * is_weights.detach().to(objective.dtype)
    kl = kl_k3(logprobs, ref_logprobs if ref_logprobs is not None else old_logprobs)
    if beta:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs ref_logprobs")
        objective = objective - beta * kl
    objective = objective * mask
    total = (objective.sum(-1) / lens.clamp(min=1)).sum() if loss_agg == "sequence" else objective.sum()
    loss = -total / (normalizer if normalizer is not None else loss_normalizer(lens, loss_agg, max_completion_len))
    with torch.no_grad():
        n = float(mask.sum())
        low = ((ratio < 1 - clip_eps_low) & (adv < 0)).to(mask.dtype) * mask
        high = ((ratio > 1 + clip_eps_high) & (adv > 0)).to(mask.dtype) * mask
        stats = dict(clip_frac_low=float(low.sum()) / max(n, 1), clip_frac_high=float(high.sum()) / max(n, 1),
                     kl=float((kl * mask).sum()) / max(n, 1), tokens=n,
                     ratio_max=float(ratio.masked_fill(mask == 0, 0).max()) if n else 1.0)
        stats["clip_frac"] = stats["clip_frac_low"] + stats["clip_frac_high"]
    return loss, stats


ROLLOUT_IS_MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def rollout_is_weights(logprobs, sampler_logprobs, mask, mode="token_truncate", cap=2.0, floor=0.5):
    """Importance weights for rollouts drawn from another distribution than the trainer's pi_old (a bf16 sampler,
    top-k / top-p / min-p sampling). logprobs: the trainer's log pi_old [B, T]; sampler_logprobs: each token's
    log-prob under the distribution it was drawn from [B, T]; mask [B, T]. With r_t = exp(logprobs - sampler_logprobs)
    on masked tokens and R = prod_t r_t per row:
      none:              1
      token_truncate:    min(r_t, cap)  (truncated IS: Yao et al. 2025, "Your efficient RL framework secretly brings
                         you off-policy RL training")
      token_mask:        r_t where floor <= r_t <= cap, else 0
      sequence_truncate: min(R, cap) on every token of the row
      sequence_mask:     R where floor <= R <= cap, else 0 for the whole row
    -> (weights: detached, 0 where mask is 0; stats over the masked tokens: is_mean, is_max (of the ratio the mode
    weighs with, r_t or R), is_clipped_frac (truncated or masked out; for "none", what token_truncate would
    truncate), mismatch_kl (the token mean of r - log r - 1, the k3 estimate of KL(sampler || trainer)), tokens)."""
    if mode not in ROLLOUT_IS_MODES:
        raise ValueError(f"rollout IS mode={mode!r}: expected one of {', '.join(ROLLOUT_IS_MODES)}")
    if not cap > 0:
        raise ValueError(f"rollout IS cap={cap}: expected > 0")
    keep = mask.bool()
    with torch.no_grad():
        log_r = (logprobs.double() - sampler_logprobs.double()).masked_fill(~keep, 0.0)  # -inf padding: 0 before exp
        r = log_r.exp()
        if mode.startswith("sequence"):
            r = log_r.sum(-1, keepdim=True).exp().expand_as(r)
        if mode.endswith("mask"):
            weights = torch.where((r >= floor) & (r <= cap), r, 0.0)
        elif mode == "none":
            weights = torch.ones_like(r)
        else:
            weights = r.clamp(max=cap)
        weights = torch.where(keep, weights, 0.0)
        n = int(keep.sum())
        changed = (r > cap) if mode == "none" else (weights != r)
        stats = dict(is_mean=float(r[keep].mean()) if n else 1.0, is_max=float(r[keep].max()) if n else 1.0,
                     is_clipped_frac=float((changed & keep).sum()) / max(n, 1), tokens=n,
                     mismatch_kl=float((log_r.exp() - log_r - 1)[keep].mean()) if n else 0.0)
    return weights.to(logprobs.dtype), stats


def overlong_penalty(length, max_len, buffer):
    """DAPO's soft overlong punishment (arXiv 2503.14476 eq. 13): 0 up to max_len - buffer, then falling linearly
    to -1 at max_len (and -1 beyond)."""
    if length <= max_len - buffer:
        return 0.0
    if length <= max_len:
        return ((max_len - buffer) - length) / buffer
    return -1.0


# -----------------------------------------------------------------------------
# distillation


def reverse_kl_loss(student_lp, teacher_lp, mask):
    """On-policy distillation on the student's own samples. student_lp / teacher_lp: [B, T] log-probs of the
    sampled tokens under each model (student differentiable), mask [B, T]. The per-token estimate of the reverse KL
    KL(pi_student || pi_teacher) at a sampled token is k_t = log pi_s(x_t) - log pi_t(x_t) (its mean over samples
    is the exact KL); -k_t is that token's advantage, so the loss is sum_t k_t.detach() * log pi_s(x_t), whose
    expected gradient is the gradient of the reverse KL (E[grad log pi_s] = 0 removes the term the detach drops).
    -> (summed loss, summed k_t): divide both by the token count."""
    k = (student_lp - teacher_lp).detach() * mask
    return (k * student_lp).sum(), k.sum()


# -----------------------------------------------------------------------------
# reward model


def bradley_terry_loss(chosen, rejected):
    """Bradley-Terry on the scores of preference pairs (InstructGPT, arXiv 2203.02155 eq. 1): -> (sum over pairs of
    -log sigmoid(r_chosen - r_rejected), the number of pairs ranked right, r_chosen > r_rejected). logsigmoid is
    stable for any margin."""
    margin = chosen - rejected
    return -F.logsigmoid(margin).sum(), (margin.detach() > 0).sum()
