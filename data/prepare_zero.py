"""The R1-Zero base's pretraining corpus: what a small base model has read before pure RL (config/r1zero_tiny.py).

A real base has read questions answered in many layouts, and in every one of them the answer is mostly stated
outright; worked solutions, now and then with a slip caught and fixed, are a minority everywhere. So no layout and no
prompt makes it work problems out most of the time, while sampling still does some of the time: that is what
R1-Zero's RL amplifies. This corpus gives the tiny base the same kind of reading:
  - one problem a document, in one of six layouts: R1-Zero's template (the template with the question, then the
    reply), four plain-text ones (`Q: ...\\nA:\\n`, `Question: ...\\nAnswer:\\n`, `What is ...?\\n`,
    `Problem: ...\\nSolution:\\n`) and the bare fact `7+8*3-5=26`;
  - in every layout but the bare fact most replies give the answer outright, `The answer is 26.`; in `worked_frac`
    of them (3 in 10) the working comes first, one operation a line, then the same sentence. The two kinds part at
    the first token of the reply: "The" (the same word in every layout) against the first operand of the first
    step, so greedy decoding follows the likelier, outright kind. Worked solutions have no opening words of their
    own, so no prompt can end with them;
  - `check_frac` of the worked solutions (8 in 100) check their steps, the way careful people do: each step, with
    probability one half (at least one), is checked by substituting its result back (`16+8=24` then `Check:
    24-8=16`; `8*3=24` then `Check: 3*8=24`; tiny_task.checked_lines). The check is a computation of its own, so it
    can disagree: in `slip_frac` of the checked steps (1 in 4) the result was first written wrong, the check says so
    (`Check: 21-8=13, not 16`) and the step is worked again, right, and the work goes on from it; in
    `check_slip_frac` of the others (1 in 10) the check itself slips, and the step worked again stands as written.
    Most checks agree, so a check is no sign that something was wrong, and what settles a disagreement is working
    the step again, not changing it;
  - exercises in checking (`Check each step: 7+8*3-5`, then every step worked and checked the same way), like the
    drills of a textbook: they teach the skill, while in the layouts a question comes in checking stays rare;
  - tables of single operations (`6*11=66`, `31-5=26`, one a line, drawn from the steps of random problems and
    shuffled), like the arithmetic tables of web text: they teach each step without being anyone's solution.
The outright answers are the true ones, which a tiny model cannot compute in one shot: answering outright, it guesses.
No problem of data/tiny/test.jsonl or data/tiny/train.jsonl appears (the held-out set and the RL prompts); every
problem has at least two operations, so no line of a table is one.

    python data/prepare_zero.py         # -> data/tiny/zero_pretrain.jsonl (seeded, byte-stable, ~20 s)
    python data/prepare_zero.py --prompts=out   # -> out/test_{qa,question,plain,problem,bare}.jsonl: test.jsonl's
                                                #    problems as the plain layouts' prompts (for sample.py --eval)
"""
import argparse
import itertools
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

from data import tiny_task
from data.jsonl import write_jsonl

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny")
# R1-Zero's template (DeepSeek-R1, arXiv 2501.12948, Table 1), as tasks.R1_ZERO_TEMPLATE renders it
R1_ZERO = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
           "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
           "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
           "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
           "User: {prompt}. Assistant:")
# the plain layouts: what comes before the reply ({q} the question, {e} the bare expression); the reply follows
PLAIN_LAYOUTS = {
    "qa": "Q: {q}\nA:\n",
    "question": "Question: {q}\nAnswer:\n",
    "plain": "{q}\n",
    "problem": "Problem: {e}\nSolution:\n",
}


def reply(expr, rng, worked_frac, check_frac, slip_frac, check_slip_frac):
    """The answer outright, `The answer is 26.`, or (worked_frac) the working, now and then checked, and then that
    sentence."""
    final = f"The answer is {tiny_task.answer(expr)}."
    if rng.random() >= worked_frac:
        return final
    if rng.random() < check_frac:
        steps = tiny_task.checked_lines(expr, rng, check_prob=0.5, slip_frac=slip_frac,
                                            check_slip_frac=check_slip_frac)
    else:
        steps = tiny_task.solution_lines(expr)
    return "\n".join(steps + [final])


def problem_text(expr, rng, template_frac, bare_frac, worked_frac, check_frac, slip_frac,
                 check_slip_frac):
    """One problem in one layout: R1-Zero's template, a plain one, or the bare fact."""
    u = rng.random()
    if u < bare_frac:
        return f"{expr}={tiny_task.answer(expr)}"
    body = reply(expr, rng, worked_frac, check_frac, slip_frac, check_slip_frac)
    if u < bare_frac + template_frac:
        return R1_ZERO.format(prompt=tiny_task.question(expr)) + \
            f" <think>\n{body}\n</think> <answer> {tiny_task.answer(expr)} </answer>"
    layout = PLAIN_LAYOUTS[rng.choice(sorted(PLAIN_LAYOUTS))]
    return layout.format(q=tiny_task.question(expr), e=expr) + body


def drill_text(expr, rng, slip_frac, check_slip_frac):
    """An exercise in checking: the problem, every step worked and checked, the answer."""
    steps = tiny_task.checked_lines(expr, rng, check_prob=1.0, slip_frac=slip_frac, check_slip_frac=check_slip_frac)
    return "\n".join([f"Check each step: {expr}", *steps, f"The answer is {tiny_task.answer(expr)}."])


def table_text(rng, n_facts):
    """n_facts single operations, one a line (`6*11=66`), drawn from the steps of random problems and shuffled."""
    facts = []
    while len(facts) < n_facts:
        facts += [line.split(",")[0] for line in tiny_task.solution_lines(tiny_task.generate(rng))]
    facts = facts[:n_facts]
    rng.shuffle(facts)
    return "\n".join(facts)


def corpus(n, seed, held_out, template_frac, bare_frac, worked_frac, check_frac, slip_frac, check_slip_frac, drills,
           tables, facts_per_table):
    """n documents {"text"} about n distinct problems and `drills` exercises in checking about as many others, none
    of them in held_out, and `tables` tables of single operations, shuffled together."""
    rng = random.Random(f"{seed}:zero")
    problems = tiny_task.fresh_problems(rng, set(held_out))
    rows = [{"text": problem_text(expr, rng, template_frac, bare_frac, worked_frac, check_frac, slip_frac,
                                  check_slip_frac)} for expr in itertools.islice(problems, n)]
    rows += [{"text": drill_text(expr, rng, slip_frac, check_slip_frac)} for expr in itertools.islice(problems, drills)]
    rows += [{"text": table_text(rng, facts_per_table)} for _ in range(tables)]
    rng.shuffle(rows)
    return rows


def prompt_rows(rows, layout):
    """test.jsonl-style rows {"prompt": "What is ...?", "answer"} -> the same problems as one layout's prompts."""
    out = []
    for r in rows:
        expr = r["prompt"][len("What is "):-1]
        text = f"{expr}=" if layout == "bare" else PLAIN_LAYOUTS[layout].format(q=r["prompt"], e=expr)
        out.append({"prompt": text, "answer": r["answer"]})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(TINY, "zero_pretrain.jsonl"))
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--n", type=int, default=120000, help="problem documents, one problem each")
    p.add_argument("--template_frac", type=float, default=0.25, help="problems in R1-Zero's template")
    p.add_argument("--bare_frac", type=float, default=0.1, help="problems as a bare fact, `7+8*3-5=26`")
    p.add_argument("--worked_frac", type=float, default=0.3, help="in every other layout: share answered after "
                   "working (the rest: outright)")
    p.add_argument("--check_frac", type=float, default=0.08, help="worked solutions that check their steps")
    p.add_argument("--slip_frac", type=float, default=0.25, help="checked steps first written with a wrong result")
    p.add_argument("--check_slip_frac", type=float, default=0.1, help="checks of a right step that slip themselves")
    p.add_argument("--drills", type=int, default=10000, help="exercises in checking every step of a problem")
    p.add_argument("--tables", type=int, default=8000, help="tables of single operations")
    p.add_argument("--facts_per_table", type=int, default=32)
    p.add_argument("--prompts", default="", help="instead: write test.jsonl as each plain layout's prompts into DIR")
    args = p.parse_args(argv)
    if args.prompts:
        with open(os.path.join(TINY, "test.jsonl"), encoding="utf-8") as f:
            test = [json.loads(line) for line in f]
        os.makedirs(args.prompts, exist_ok=True)
        for layout in [*PLAIN_LAYOUTS, "bare"]:
            write_jsonl(os.path.join(args.prompts, f"test_{layout}.jsonl"), prompt_rows(test, layout))
        print(f"wrote {len(PLAIN_LAYOUTS) + 1} prompt files of {len(test)} problems to {args.prompts}")
        return
    held_out = tiny_task.problems_in([os.path.join(TINY, "test.jsonl"), os.path.join(TINY, "train.jsonl")])
    rows = corpus(args.n, args.seed, held_out, args.template_frac, args.bare_frac, args.worked_frac,
                  args.check_frac, args.slip_frac, args.check_slip_frac, args.drills, args.tables, args.facts_per_table)
    write_jsonl(args.out, rows)
    print(f"wrote {len(rows)} documents to {args.out}")


if __name__ == "__main__":
    main()
