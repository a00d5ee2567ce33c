"""
R1's stage-3 rejection sampling (DeepSeek-R1, arXiv 2501.12948 sec. 2.3.3): K samples per problem, kept only when
correct, well formed, in one language, within budget, not degenerate and not a duplicate, then at most
max_per_prompt per prompt. Each sample is a tasks.Rollout, checked on its text (what the model wrote); the kept ones
become SFT rows with provenance. sample.py --reject=1 and distill.py's sequence mode run it.

    kept, report = rejection_sample(engine, tok, rows, num_samples=4, sampling=dict(max_new_tokens=512))
    save_samples("out/reject/x.jsonl", kept, report)
"""
import json
import random
import re
from collections import Counter

from data.jsonl import write_jsonl
from reward import accuracy_reward, code_reward, format_reward, language_consistency_reward
from tasks import Rollout, encode_problem, prompt_messages, sample_problems, think_prefix

# Why a sample is dropped, in the order the checks run; a sample failing several is counted under the first.
# The per-sample checks (check_sample) go cheapest first, so correctness (for code rows a sandboxed test run)
# is decided last; the per-prompt ones follow: an exact duplicate of an earlier good sample of the same prompt,
# then the good samples past max_per_prompt.
REJECT_REASONS = ("too_long", "format", "language", "degenerate", "incorrect", "duplicate", "over_max_per_prompt")

# what a kept SFT row takes from its sample's Rollout.record(), under the same names
PROVENANCE = ("problem_index", "sample_index", "seed", "num_tokens", "parts")

_PIECE = re.compile(r"\w+|[^\w\s]+")  # n-gram units: words / numbers, and runs of symbols

_LETTER = re.compile(r"[^\W\d_]")

_LATEX_CMD = re.compile(r"\\[A-Za-z]+")


def max_ngram_count(text, n):
    """How often the most frequent n-gram of text's pieces (words, numbers, symbol runs) occurs, overlaps
    counted: a completion stuck in a loop repeats its period's n-grams once per turn of the loop."""
    pieces = _PIECE.findall(text)
    if len(pieces) < n:
        return 0
    return max(Counter(tuple(pieces[i:i + n]) for i in range(len(pieces) - n + 1)).values())


def cot_language(text, lang="en"):
    """reward.language_consistency_reward of a well-formed assistant turn, except that a chain of thought with no
    words at all (pure arithmetic, the tiny task's) mixes no languages and scores 1.0 (the reward gives 0.0,
    which is right for RL, where an empty CoT must not pay)."""
    score = language_consistency_reward(text, lang)
    cot = text.split("<think>", 1)[-1].split("</think>", 1)[0]
    return score if _LETTER.search(_LATEX_CMD.sub(" ", cot)) else 1.0


def check_sample(text, finish_reason, n_tokens, row, max_completion_tokens=None, ngram_size=20,
                 max_ngram_repeats=4, lang="en", min_language=1.0, code_timeout=5.0):
    """Run the per-sample checks of REJECT_REASONS in order on one sample. -> (reason or None to keep it,
    parts: the reward values computed up to the first failure: format, language, accuracy or code).

    text: the whole assistant turn the model wrote, starting at <think> (if the prompt already opened it, as the
    R1-Distill template does, put that "<think>\\n" in front). Checks: too_long: not finished by a stop
    (truncated) or more than max_completion_tokens tokens; format: reward.format_reward strict, <think>
    reasoning </think> then a non-empty answer; language: cot_language < min_language; degenerate: some
    ngram_size-gram occurs more than max_ngram_repeats times; incorrect: reward.accuracy_reward against the
    row's `answer` is not 1, or, for a row with `tests`, not every test passes (reward.code_reward)."""
    parts = {}
    if finish_reason != "stop" or (max_completion_tokens and n_tokens > max_completion_tokens):
        return "too_long", parts
    parts["format"] = format_reward(text, "strict")
    if parts["format"] < 1:
        return "format", parts
    parts["language"] = cot_language(text, lang)
    if parts["language"] < min_language:
        return "language", parts
    if max_ngram_count(text, ngram_size) > max_ngram_repeats:
        return "degenerate", parts
    if "tests" in row:
        parts["code"] = code_reward(text, row["tests"], row.get("timeout", code_timeout))
        ok = parts["code"] >= 1.0
    elif "answer" in row:
        parts["accuracy"] = accuracy_reward(text, row["answer"])
        ok = parts["accuracy"] >= 1.0
    else:
        raise ValueError(f"problem row has neither 'answer' nor 'tests' to check a completion against: {row!r}"[:300])
    return (None if ok else "incorrect"), parts


def checked_rollout(i, j, item, completion, prefix, limits):
    """Sample j of problem i through check_sample, on its text (what the model wrote: a tool's output is not the
    model's) after the prefix the prompt opened. -> (reason or None, the Rollout: parts check_sample's values,
    reward its accuracy or code reward, 0.0 when a check before it failed)."""
    reason, parts = check_sample(prefix + completion.text, completion.finish_reason, len(completion.tokens),
                                 item["row"], **limits)
    reward = parts.get("accuracy", parts.get("code", 0.0))
    return reason, Rollout(i, item, completion, reward, parts, parts.get("accuracy"), sample_index=j)


def _select(i, checked, max_per_prompt, prefer, seed):
    """One problem's K (reason, Rollout) pairs from checked_rollout -> the reason per sample (None for the kept
    ones): an exact duplicate of an earlier good sample is dropped, then the good ones past max_per_prompt."""
    reasons, good, seen = [], [], set()
    for j, (reason, r) in enumerate(checked):
        if reason is None and r.text in seen:
            reason = "duplicate"
        reasons.append(reason)
        if reason is None:
            seen.add(r.text)
            good.append(j)
    if prefer == "shortest":
        good.sort(key=lambda j: (len(checked[j][1].completion.tokens), j))  # stable: among equals the earlier one
    else:  # seeded by the problem index: the same choice whatever the rank split
        random.Random(seed + i).shuffle(good)
    for j in good[max_per_prompt or len(good):]:
        reasons[j] = "over_max_per_prompt"
    return reasons


def rejection_sample(engine, tok, rows, num_samples=4, sampling=None, seed=0, template="chat", max_per_prompt=1,
                     prefer="shortest", max_completion_tokens=None, ngram_size=20, max_ngram_repeats=4, lang="en",
                     min_language=1.0, rank=0, world=1, source="", row_files=None, batch_size=32, progress=False):
    """R1's stage-3 rejection sampling: num_samples completions per problem row, kept when check_sample passes
    them, and not an exact duplicate of an earlier kept sample of the same prompt; then at most max_per_prompt
    per prompt (0: no cap), the shortest (prefer="shortest", fewest tokens) or a seeded random choice
    (prefer="random"). -> (kept rows in problem then sample order, report).

    rows: problem rows (`prompt` or `messages`, and `answer` or `tests`), encoded by encode_problem(template);
    sampling: Engine.generate keywords (max_new_tokens, temperature, ...). The samples come from
    tasks.sample_problems (seed + i*num_samples + j), so under torchrun every rank returns the rows and report of one
    process.
    Each kept row is an SFT row for train_sft.py: {"messages": prompt turns + the assistant turn (the whole
    completion, <think> block included)}, with provenance: source (checkpoint), source_file and source_row
    (row_files[i] and the row's index in that file), and from its tasks.Rollout.record(): problem_index,
    sample_index, seed, num_tokens (generated, stop token included) and parts (the values check_sample computed).
    The report: problems, samples, kept, acceptance_rate (kept / samples), problems_with_kept,
    mean_kept_tokens, rejected {reason: count} over REJECT_REASONS, per_source {file: problems, samples, kept,
    rate}, and the settings used."""
    if prefer not in ("shortest", "random"):
        raise ValueError(f"prefer={prefer!r}: expected 'shortest' or 'random'")
    if max_per_prompt < 0:
        raise ValueError(f"max_per_prompt={max_per_prompt}: expected >= 0 (0: no cap)")
    K, sampling = num_samples, dict(sampling or {})
    files = list(row_files) if row_files is not None else [""] * len(rows)
    if len(files) != len(rows):
        raise ValueError(f"row_files has {len(files)} entries for {len(rows)} rows")
    limits = dict(max_completion_tokens=max_completion_tokens, ngram_size=ngram_size,
                  max_ngram_repeats=max_ngram_repeats, lang=lang, min_language=min_language)
    def judge(i, samples):  # -> (reason per sample, None for the kept ones; the kept Rollouts)
        if len(samples) != K:
            raise ValueError(f"engine returned {len(samples)} samples for problem {i}, expected {K}")
        item, prefix = {"row": rows[i], "ids": prompts[i]}, think_prefix(tok, prompts[i])
        checked = [checked_rollout(i, j, item, c, prefix, limits) for j, c in enumerate(samples)]
        reasons = _select(i, checked, max_per_prompt, prefer, seed)
        return reasons, [r for reason, (_, r) in zip(reasons, checked) if reason is None]

    prompts = [encode_problem(tok, row, template) for row in rows]
    results = sample_problems(engine, prompts, K, sampling, judge, seed, batch_size, rank, world, "reject", progress)

    source_row, counts = [], Counter()  # each row's index within its own file
    for f in files:
        source_row.append(counts[f])
        counts[f] += 1
    kept_rows, rejected = [], Counter()
    per_source = {f: dict(problems=0, samples=0, kept=0, rate=0.0) for f in dict.fromkeys(files)}
    for i, (reasons, kept) in enumerate(results):
        rejected.update(r for r in reasons if r is not None)
        ps = per_source[files[i]]
        ps["problems"] += 1
        ps["samples"] += K
        ps["kept"] += len(kept)
        prefix = think_prefix(tok, prompts[i])  # the "<think>\n" a prompt opened belongs to the assistant turn
        for r in kept:
            turn, line = {"role": "assistant", "content": prefix + r.text}, r.record()
            kept_rows.append({"messages": prompt_messages(rows[i]) + [turn], "source": source,
                              "source_file": files[i], "source_row": source_row[i],
                              **{k: line[k] for k in PROVENANCE}})
    for ps in per_source.values():
        ps["rate"] = ps["kept"] / ps["samples"] if ps["samples"] else 0.0
    n = len(rows) * K
    report = dict(problems=len(rows), samples=n, kept=len(kept_rows), acceptance_rate=len(kept_rows) / n if n else 0.0,
                  problems_with_kept=sum(bool(kept) for _, kept in results),
                  mean_kept_tokens=sum(r["num_tokens"] for r in kept_rows) / len(kept_rows) if kept_rows else 0.0,
                  rejected={r: rejected[r] for r in REJECT_REASONS}, per_source=per_source,
                  settings=dict(source=source, num_samples=K, seed=seed, template=template,
                                max_per_prompt=max_per_prompt, prefer=prefer, **limits, sampling=sampling))
    return kept_rows, report


def save_samples(path, kept, report):
    """The kept rows to path (JSONL) and the report beside them (path + .report.json)."""
    write_jsonl(path, kept)
    with open(path + ".report.json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
