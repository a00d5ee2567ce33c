"""
Problems: the rows RL, evaluation and rejection sampling pose to a model. Loading them, the prompt templates that
turn them into token ids, and scoring a model's samples: against their answers (pass@1, pass@k, maj@k), or, for
prompts no rule can check, by a frozen reward model (RewardModelScorer, R1 stage 4). A scored sample is a Rollout,
the one record evaluation, rejection sampling and GRPO hand on.

    problems = load_problems("data/tiny/test.jsonl")
    prompts = [encode_problem(tok, row, "chat") for row in problems]
    acc = held_out_accuracy(engine, problems, prompts, dict(max_new_tokens=128))      # greedy pass@1
"""
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from data.jsonl import iter_jsonl
from data.tiny_task import read_checks
from engine import Completion
from model import RewardModel
from reward import accuracy_reward, answer_part, extract_answer, format_reward

# -----------------------------------------------------------------------------
# problem rows and prompt templates


def load_problems(path, targets=("answer",)):
    """JSONL rows with `prompt` (str) or `messages` (list) and at least one of the `targets` fields to check a
    completion against (default `answer`; rejection sampling also takes code rows' `tests`); errors name file:line."""
    rows = []
    for lineno, row in iter_jsonl(path, required=targets if len(targets) == 1 else ()):
        if not any(k in row for k in targets):
            raise ValueError(f"{path}:{lineno}: missing field {' or '.join(map(repr, targets))}")
        if not isinstance(row.get("messages"), list) and not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}:{lineno}: needs 'prompt' (a string) or 'messages' (a list)")
        rows.append(row)
    return rows


R1_ZERO_TEMPLATE = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
                    "The assistant first thinks about the reasoning process in the mind and then provides the user "
                    "with the answer. The reasoning process and answer are enclosed within <think> </think> and "
                    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
                    "<answer> answer here </answer>. User: {prompt}. Assistant:")


# Tool-integrated reasoning from a base model, in the manner of ToRL (arXiv 2503.23383, sec. 2.1): the prompt says
# that ```python blocks run and their output comes back in ```output blocks (the code tool format, tools.py)
TIR_TEMPLATE = ("Solve the problem below. You may write Python code in ```python blocks; each block is run as it "
                "closes and what it prints comes back in an ```output block, so you can compute with it and check "
                "your work. Put the final answer in \\boxed{{}}.\n\nProblem: {prompt}\n\nSolution:")

PROMPT_TEMPLATES = ("chat", "raw", "r1zero", "tir")


def encode_problem(tok, row, template="chat", tools=None):
    """A problem row -> prompt token ids. template "chat": the tokenizer's chat template (rows with `messages`
    always use it, as the conversation they are), listing `tools` (JSON schemas, tools.ToolUse.schemas) in its
    system turn; "raw": `prompt` as plain text; "r1zero" / "tir": R1_ZERO_TEMPLATE / TIR_TEMPLATE around `prompt`
    (or the last user turn of `messages`). A bool means "chat" (True) or "raw" (False)."""
    template = {True: "chat", False: "raw"}.get(template, template) if isinstance(template, bool) else template
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"prompt template {template!r}: expected one of {', '.join(PROMPT_TEMPLATES)}")
    messages = row.get("messages") if isinstance(row.get("messages"), list) else None
    if template in ("r1zero", "tir"):
        prompt = row["prompt"] if isinstance(row.get("prompt"), str) else \
            next(m["content"] for m in reversed(messages) if m.get("role") == "user")
        return tok.encode((R1_ZERO_TEMPLATE if template == "r1zero" else TIR_TEMPLATE).format(prompt=prompt))
    if messages is not None or template == "chat":
        return tok.apply_chat_template(messages or [{"role": "user", "content": row["prompt"]}], tools=tools)
    return tok.encode(row["prompt"])


def prompt_messages(row):
    """The conversation a problem row asks: its `messages`, or its `prompt` as one user turn."""
    if isinstance(row.get("messages"), list):
        return [dict(m) for m in row["messages"]]
    return [{"role": "user", "content": row["prompt"]}]


def think_prefix(tok, prompt_ids):
    """The "<think>..." a prompt ends with when its chat template opens the think block for the model (the
    R1-Distill template's "<｜Assistant｜><think>\\n"), else "": it belongs to the assistant turn."""
    text = tok.decode(prompt_ids)
    i = text.rstrip().rfind("<think>")
    return text[i:] if i >= 0 and text.rstrip().endswith("<think>") else ""


# -----------------------------------------------------------------------------
# scoring samples: one Rollout each; `correct` is per problem a list of K bools, `answers` the extracted
# answers (None = none)


@dataclass
class Rollout:
    """One sampled completion of one prompt and its scores: the record evaluation (score_problems), rejection sampling
    and GRPO all hand on, from the Engine to the metrics, the loss and the JSONL files (record()). Its text is what
    the model wrote, what every reward reads; completion.transcript (every token decoded, a tool's output too) is for
    logs only."""
    problem_index: int  # the prompt's index among those sampled together: in the problem list (evaluation, rejection
    # sampling), in the step's draw (GRPO)
    item: dict  # the prompt: {"row": its JSONL row, "ids": its token ids}, in GRPO also "where": "file:line"
    completion: Completion  # what the Engine wrote: tokens, text, transcript, logprobs, loss_mask, tool_calls, seed
    reward: float  # the weighted total: GRPO's reward.RewardFn (or the reward model's score x its weight); in
    # evaluation its accuracy; in rejection sampling its accuracy or code reward (0.0 if a check before it failed)
    parts: dict  # each reward component, unweighted (evaluation: accuracy, format; rejection: check_sample's values)
    accuracy: float | None  # accuracy_reward against the row's answer; None when it has none (or it was not checked)
    advantage: float | None = None  # its group-relative advantage: GRPO's rollout_batch sets it
    in_loss: bool = True  # False: DAPO's overlong filter (--overlong=mask) took a truncated completion out
    sample_index: int = 0  # its index among the prompt's samples (GRPO: in its group)

    @property
    def text(self):
        """What the model wrote (never a tool's output): what the rewards read."""
        return self.completion.text

    @property
    def answer(self):
        """The problem's gold answer (None for a row without one)."""
        return self.item["row"].get("answer")

    @property
    def pred(self):
        """The answer the model gave: the final answer extracted from its text after </think> (None: none)."""
        return extract_answer(answer_part(self.text))

    @property
    def correct(self):
        """Whether its answer matches the gold one (None for a row without one)."""
        return None if self.accuracy is None else self.accuracy >= 1.0

    @property
    def rechecks(self):
        """How many lines of its text go back over earlier work (count_rechecks: the 'aha' measure)."""
        return count_rechecks(self.text)

    @property
    def checks(self):
        """Its checks of a step, as the tiny world writes them (tiny_task.read_checks): each one confirms the step as
        written or changes it, and a change may fix a slip."""
        return read_checks(self.text)

    @property
    def length(self):
        """Its row in the update's batches: prompt and completion tokens."""
        return len(self.item["ids"]) + len(self.completion.tokens)

    @property
    def loss_mask(self):
        """Per token, 1 where the loss counts it: the tokens the model sampled (not a tool's), if it is in the loss."""
        return self.completion.loss_mask if self.in_loss else [0] * len(self.completion.tokens)

    def record(self, tok=None):
        """Its JSON line (evaluation's sample files, GRPO's rollouts.jsonl; rejection sampling's kept rows take their
        provenance from it): every field name on disk is decided here. With a tokenizer, the prompt decoded too."""
        c = self.completion
        line = dict(problem_index=self.problem_index, sample_index=self.sample_index, seed=c.seed)
        if "where" in self.item:
            line["where"] = self.item["where"]
        if tok is not None:
            line["prompt"] = tok.decode(self.item["ids"])
        line.update(answer=self.answer, pred=self.pred, correct=self.correct, reward=self.reward, parts=self.parts)
        if self.advantage is not None:
            line["advantage"] = self.advantage
        line.update(rechecks=self.rechecks, finish_reason=c.finish_reason, num_tokens=len(c.tokens),
                    tool_tokens=c.tool_tokens, text=c.text, transcript=c.transcript, tokens=c.tokens,
                    loss_mask=c.loss_mask, tool_calls=c.tool_calls)
        return line


def sample_problems(engine, prompts, num_samples, sampling, judge, seed=0, batch_size=32, rank=0, world=1, desc="",
                    progress=False):
    """num_samples completions of each prompt (token ids, one per problem), judged problem by problem: -> the list of
    judge(problem index, its samples), in problem order, on every rank. Rank r samples problems r, r+world, ... and
    the judgements are all-gathered; sample j of problem i has the seed seed + i*num_samples + j, so the rank split
    never changes a sample. sampling: Engine.generate keywords."""
    K, mine, results = num_samples, list(range(rank, len(prompts), world)), []
    bar = tqdm(total=len(prompts), desc=desc, disable=rank != 0 or not progress, dynamic_ncols=True, leave=False)
    for s in range(0, len(mine), batch_size):
        idx = mine[s:s + batch_size]
        seeds = [seed + i * K + j for i in idx for j in range(K)]
        outs = engine.generate([prompts[i] for i in idx], num_samples=K, seed=seeds, **sampling)
        results += [(i, judge(i, samples)) for i, samples in zip(idx, outs)]
        bar.update(min(len(idx) * world, bar.total - bar.n))  # the other ranks keep about the same pace
    bar.close()
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    return [r for _, r in sorted(results, key=lambda r: r[0])]


def score_problems(engine, problems, prompts, num_samples, sampling, seed=0, batch_size=32, rank=0, world=1,
                   progress=True, format_mode="strict"):
    """sample_problems, each sample a Rollout scored on its text (a tool's output is not the model's answer): reward
    and parts["accuracy"] reward.accuracy_reward against its problem's `answer`, parts["format"] its
    format_reward(format_mode). -> (per problem a list of Rollouts, generated tokens over all ranks)."""
    def judge(i, samples):
        item = {"row": problems[i], "ids": prompts[i]}
        rollouts = []
        for j, c in enumerate(samples):
            accuracy = accuracy_reward(c.text, problems[i]["answer"])
            parts = {"accuracy": accuracy, "format": format_reward(c.text, format_mode)}
            rollouts.append(Rollout(i, item, c, accuracy, parts, accuracy, sample_index=j))
        return rollouts

    results = sample_problems(engine, prompts, num_samples, sampling, judge, seed, batch_size, rank, world, "eval",
                              progress)
    return results, sum(len(r.completion.tokens) for rollouts in results for r in rollouts)


# a line that re-evaluates earlier work, as R1-Zero's do (DeepSeek-R1, arXiv 2501.12948, Table 3: "Wait, wait. Wait.
# That's an aha moment I can flag here."); count_rechecks adds the tiny world's checks (tiny_task.read_checks)
_REEVALUATE = re.compile(r"^[^\S\n]*(?:<think>[^\S\n]*)?(?:wait|hmm|let me (?:re-?)?check|re-?check|double-check)\b",
                         re.IGNORECASE | re.MULTILINE)


def count_rechecks(text):
    """How many lines of a completion go back over earlier work: lines that begin wait, hmm, let me check, re-check
    or double-check, and the tiny world's checks (tiny_task.read_checks: a step's result substituted back,
    `Check: 24-8=16`)."""
    return len(_REEVALUATE.findall(text)) + len(read_checks(text))


def pass_at_1(correct):
    """Mean over problems of the fraction of correct samples (the unbiased pass@1 estimate)."""
    return sum(sum(c) / len(c) for c in correct) / len(correct)


def pass_at_k(correct):
    """Fraction of problems with at least one correct sample among its K."""
    return sum(any(c) for c in correct) / len(correct)


def majority_vote(answers, equiv=None):
    """Index of the sample whose answer is the most common one (None if no sample has an answer).
    Answers are grouped with equiv(a, b) (default ==); a tie goes to the answer seen first."""
    equiv = equiv or (lambda a, b: a == b)
    groups = []  # [first index, count, representative answer]
    for i, a in enumerate(answers):
        if a is None:
            continue
        for g in groups:
            if equiv(a, g[2]):
                g[1] += 1
                break
        else:
            groups.append([i, 1, a])
    if not groups:
        return None
    return max(groups, key=lambda g: (g[1], -g[0]))[0]


def maj_at_k(correct, answers, equiv=None):
    """Fraction of problems whose majority answer is correct."""
    hits = 0
    for c, a in zip(correct, answers):
        i = majority_vote(a, equiv)
        hits += i is not None and bool(c[i])
    return hits / len(correct)


def held_out_accuracy(engine, problems, prompts, sampling, seed=0, rank=0, world=1):
    """Greedy pass@1 over the held-out problems (prompts: their token ids), the measure every trainer reports.
    sampling: Engine.generate keywords (max_new_tokens, stop, ...); the temperature is set to 0."""
    greedy = {**sampling, "temperature": 0.0}
    results, _ = score_problems(engine, problems, prompts, 1, greedy, seed, batch_size=64, rank=rank, world=world,
                                progress=False)
    return pass_at_1([[r.correct for r in rollouts] for rollouts in results])


def held_out_rm_score(engine, items, scorer, sampling, seed=0, rank=0, world=1, batch_size=64):
    """Mean RewardModelScorer score of greedy completions of held-out prompts (R1 stage 4's measure on general
    prompts, which no rule checks). items: {"row", "ids"}; rank r scores items r, r+world, ... and the sums are
    all-reduced."""
    greedy = {**sampling, "temperature": 0.0}
    mine = items[rank::world]
    total = 0.0
    for s in range(0, len(mine), batch_size):
        part = mine[s:s + batch_size]
        outs = engine.generate([it["ids"] for it in part], num_samples=1, seed=seed, **greedy)
        total += sum(scorer([(it["row"], out[0].text) for it, out in zip(part, outs)]))
    if world > 1:
        t = torch.tensor(total, dtype=torch.float64, device=scorer.device)
        dist.all_reduce(t)
        total = t.item()
    return total / max(len(items), 1)


# -----------------------------------------------------------------------------
# the learned reward (R1 stage 4): a frozen reward model scores completions of prompts no rule can check


def reward_model_input(tok, messages):
    """What a RewardModel reads, in training (--mode=rm) and when train_grpo --reward_model scores rollouts: the
    whole chat-templated conversation, ending in the assistant turn being scored (closed as the template closes it:
    `<|im_end|>\n` in ChatML); the score is taken at its last token."""
    ids, _ = tok.encode_chat_with_mask(messages)
    return ids


class RewardModelScorer:
    """A frozen model.RewardModel scoring prompt + completion, for the rows the rule rewards cannot check: batched
    (right-padded, with an attention mask), in inference mode, on the training device (bf16 on CUDA), never updated.
    scorer(pairs of (problem row, completion text)) -> raw scores; a row's reward is weight x score.

    It encodes with the policy's tokenizer, so it must have been trained with that one: its vocabulary must cover
    the policy's ids, and a tokenizer.json in its directory must have the same vocabulary; anything else is refused
    with a clear error."""

    def __init__(self, path, tok, weight, device, dtype, batch_size):
        try:
            self.model = RewardModel.from_pretrained(path, dtype=dtype, device=device).eval()
        except (KeyError, ValueError, FileNotFoundError) as e:  # e.g. a causal LM dir: no score.weight
            raise SystemExit(f"--reward_model={path}: {e.args[0] if isinstance(e, KeyError) else e}") from None
        self.model.requires_grad_(False)
        if self.model.num_labels != 1:
            raise SystemExit(f"--reward_model={path}: {self.model.num_labels} labels; a reward model has one score")
        if self.model.config.vocab_size < tok.vocab_size:
            raise SystemExit(f"--reward_model={path}: its vocabulary ({self.model.config.vocab_size} ids) does not "
                             f"cover the policy tokenizer's {tok.vocab_size}; it must use the policy's tokenizer")
        rm_tok = os.path.join(path, "tokenizer.json")
        if os.path.isfile(rm_tok):
            from tokenizers import Tokenizer as RustTokenizer
            if RustTokenizer.from_file(rm_tok).get_vocab(True) != tok._tok.get_vocab(True):
                raise SystemExit(f"--reward_model={path}: {rm_tok} is not the policy's tokenizer "
                                 f"({tok.config_path.parent}); the RM reads the policy's token ids")
        self.weight, self.device, self.batch_size = weight, device, batch_size
        self.tok, self.pad_id = tok, tok.pad_id

    def inputs(self, row, text):
        """The RM's input ids: exactly what train_sft --mode=rm trained it on (reward_model_input), the
        problem's conversation plus the completion's text as the closed assistant turn. The text is re-tokenised
        rather than the sampled ids reused, so the RM sees the same encoding (and turn ending) as in training."""
        return reward_model_input(self.tok, prompt_messages(row) + [{"role": "assistant", "content": text}])

    def __call__(self, pairs):
        seqs = [self.inputs(p, c) for p, c in pairs]
        scores = []
        for s in range(0, len(seqs), self.batch_size):
            chunk = seqs[s:s + self.batch_size]
            ids = torch.full((len(chunk), max(map(len, chunk))), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, x in enumerate(chunk):
                ids[b, :len(x)], mask[b, :len(x)] = torch.tensor(x), 1
            with torch.inference_mode():
                scores += self.model(ids.to(self.device), attention_mask=mask.to(self.device)).float().tolist()
        return scores
