"""The embedded world's task: multi-step integer arithmetic, solved one operation at a time.

A problem is an expression like `7+8*3-(5-2)`: `min_ops..max_ops` operators from + - *,
operands in 0..max_num, at most one pair of parentheses (only where it changes the steps).
Every intermediate value stays within |max_value| so each single step is a small-number fact.
The worked solution does ONE operation per line and rewrites the rest of the expression,
in school order: the parenthesised group first, then * left to right, then + - left to right:

    What is 7+8*3-(5-2)?
    5-2=3, so 7+8*3-3
    8*3=24, so 7+24-3
    7+24=31, so 31-3
    31-3=28
    The answer is 28.

Why this task: a tiny model cannot guess 28 in one shot, but it can learn each step (a local
lookup + copy), so accuracy depends on reasoning step by step; a pretrained model gets some
steps wrong, which leaves RL something to fix. Answers are checked exactly (`evaluate`).

Nothing here calls eval(): `evaluate` is a 20-line recursive-descent parser.
"""

import json
import re

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*()]))")


def tokenize(expr):
    """'7+8*(3-5)' -> [7, '+', 8, '*', '(', 3, '-', 5, ')'] (non-negative literals only)."""
    expr = expr.strip()
    tokens, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"bad character at {pos} in {expr!r}")
        tokens.append(int(m.group(1)) if m.group(1) else m.group(2))
        pos = m.end()
    return tokens


def evaluate(expr):
    """Exact integer value of an expression with + - * and parentheses (standard precedence)."""
    tokens, pos = tokenize(expr), 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        if pos == len(tokens):
            raise ValueError(f"unexpected end of {expr!r}")
        pos += 1
        return tokens[pos - 1]

    def atom():
        tok = take()
        if tok == "(":
            value = additive()
            if take() != ")":
                raise ValueError(f"missing ')' in {expr!r}")
            return value
        if not isinstance(tok, int):
            raise ValueError(f"expected a number, got {tok!r} in {expr!r}")
        return tok

    def product():
        value = atom()
        while peek() == "*":
            take()
            value *= atom()
        return value

    def additive():
        value = product()
        while peek() in ("+", "-"):
            value = OPS[take()](value, product())
        return value

    value = additive()
    if pos != len(tokens):
        raise ValueError(f"trailing tokens in {expr!r}")
    return value


def _num(value, first):
    # a negative number after an operator is written in parentheses: 4*(-3), 5-(-4)
    return str(value) if value >= 0 or first else f"({value})"


def render(tokens):
    out = []
    for i, tok in enumerate(tokens):
        out.append(_num(tok, i == 0 or tokens[i - 1] == "(") if isinstance(tok, int) else tok)
    return "".join(out)


def solve(expr):
    """One operation at a time: [(a, op, b, result, rest_tokens), ...]; the last result is the answer."""
    toks, steps = tokenize(expr), []
    while len(toks) > 1:
        if ")" in toks:  # work inside the innermost (first closing) group
            hi = toks.index(")")
            lo = max(i for i in range(hi) if toks[i] == "(") + 1
        else:
            lo, hi = 0, len(toks)
        ops = list(range(lo + 1, hi, 2))
        i = next((j for j in ops if toks[j] == "*"), ops[0])  # * before + -, leftmost first
        a, op, b = toks[i - 1], toks[i], toks[i + 1]
        toks[i - 1:i + 2] = [OPS[op](a, b)]
        if lo > 0 and hi - lo == 3:  # group is down to "(n)": drop the brackets
            toks[lo - 1:lo + 2] = [toks[lo]]
        steps.append((a, op, b, OPS[op](a, b), list(toks)))
    return steps


def solution_lines(expr):
    """['8*3=24, so 7+24-5', '7+24=31, so 31-5', '31-5=26']"""
    lines = []
    for a, op, b, c, rest in solve(expr):
        line = f"{_num(a, True)}{op}{_num(b, False)}={c}"
        lines.append(line + (f", so {render(rest)}" if len(rest) > 1 else ""))
    return lines


def recheck_lines(expr, rng):
    """solution_lines with one step first written with a wrong result, then re-checked and fixed, the way people
    catch a slip: ['8*3=21', 'Wait, 8*3=24, so 7+24-5', '7+24=31, so 31-5', '31-5=26']."""
    lines, steps = solution_lines(expr), solve(expr)
    k = rng.randrange(len(steps))
    a, op, b, c, _ = steps[k]
    slip = f"{_num(a, True)}{op}{_num(b, False)}={c + rng.choice([-10, -2, -1, 1, 2, 10])}"
    return lines[:k] + [slip, "Wait, " + lines[k]] + lines[k + 1:]


def answer(expr):
    return solve(expr)[-1][3]


def question(expr):
    return f"What is {expr}?"


def generate(rng, min_ops=2, max_ops=4, max_num=20, max_value=100, paren_prob=0.3):
    """One random problem string; retries until every intermediate value is within |max_value|."""
    while True:
        n = rng.randint(min_ops, max_ops)
        nums = [rng.randint(0, max_num) for _ in range(n + 1)]
        ops = [rng.choice("+-*") for _ in range(n)]
        toks = [nums[0]]
        for op, x in zip(ops, nums[1:]):
            toks += [op, x]
        flat = render(toks)
        expr = flat
        if n >= 2 and rng.random() < paren_prob:
            i = rng.randrange(n)  # group operands i..j (2 <= size <= n, not the whole expression)
            j = rng.randint(i + 1, min(n, i + n - 1))
            grouped = toks[:2 * i] + ["("] + toks[2 * i:2 * j + 1] + [")"] + toks[2 * j + 1:]
            candidate = render(grouped)
            # keep brackets only where they change the steps, so "(2*3)+4" never duplicates "2*3+4"
            if [s[:4] for s in solve(candidate)] != [s[:4] for s in solve(flat)]:
                expr = candidate
        if all(abs(s[3]) <= max_value for s in solve(expr)):
            return expr


def fresh_problems(rng, seen, **generate_kw):
    """Problems from generate(rng, **generate_kw), endlessly, none of them in `seen`, each added to it as it is drawn:
    files drawn from one `seen` share no problem."""
    while True:
        expr = generate(rng, **generate_kw)
        if expr not in seen:
            seen.add(expr)
            yield expr


def problems_in(paths):
    """The expressions of the question rows (`{"prompt": "What is ...?"}`) of JSONL files: e.g. test.jsonl and
    train.jsonl, which no training corpus may contain."""
    problems = set()
    for path in paths:
        with open(path, encoding="utf-8") as f:
            problems |= {json.loads(line)["prompt"][len("What is "):-1] for line in f}
    return problems


# ---- text renderings -------------------------------------------------------------------------

def r1_completion(expr, shortcut=False):
    """The R1 cold-start format: reasoning in <think>...</think>, then the answer in \\boxed{}.
    shortcut=True: a trace that skips the work and states the result in one line (`7+8*3-5=26`), as sloppy
    CoT data does; the result is still right, but a tiny model cannot compute it in one shot."""
    steps = [f"{expr}={answer(expr)}"] if shortcut else solution_lines(expr)
    return "<think>\n" + "\n".join(steps) + "\n</think>\n\\boxed{" + str(answer(expr)) + "}"


_PRETRAIN_TEMPLATES = (  # a few plain-text layouts, so the skill is not tied to one prompt format
    "Q: {q}\nA: {steps}\nThe answer is {a}.",
    "Question: {q}\nAnswer: {steps}\nThe answer is {a}.",
    "{q}\n{steps}\nThe answer is {a}.",
    "Problem: {expr}\nSolution:\n{steps}\nSo {expr}={a}.",
)


def pretrain_text(expr, rng, bare_prob=0.15):
    """A plain-text (no chat, no <think>, no \\boxed) worked solution, or sometimes a bare fact."""
    if rng.random() < bare_prob:
        return f"{expr}={answer(expr)}"
    template = rng.choice(_PRETRAIN_TEMPLATES)
    return template.format(q=question(expr), expr=expr, steps="\n".join(solution_lines(expr)), a=answer(expr))
