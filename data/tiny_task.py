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
from dataclasses import dataclass

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
# a number: digits, or a negative one in brackets, as `render` writes it after an operator
_TOKEN = re.compile(r"\s*(?:(\d+|\(-\d+\))|([-+*()]))")
_NEGATIVE = re.compile(r"\s*-\d+")  # as `render` writes one first in the expression or in a group


def tokenize(expr):
    """'7+8*(3-5)' -> [7, '+', 8, '*', '(', 3, '-', 5, ')']; a worked line's rest, '-54-(-3)', -> [-54, '-', -3]."""
    expr = expr.strip()
    tokens, pos = [], 0
    while pos < len(expr):
        m = (not tokens or tokens[-1] == "(") and _NEGATIVE.match(expr, pos)
        if m:
            tokens.append(int(m.group()))
        else:
            m = _TOKEN.match(expr, pos)
            if not m:
                raise ValueError(f"bad character at {pos} in {expr!r}")
            tokens.append(int(m.group(1).strip("()")) if m.group(1) else m.group(2))
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


def first_step(toks):
    """The next operation on a token list, in school order -> (a, op, b, result, rest_tokens, at): `at` is where the
    result stands in rest_tokens."""
    if ")" in toks:  # work inside the innermost (first closing) group
        hi = toks.index(")")
        lo = max(i for i in range(hi) if toks[i] == "(") + 1
    else:
        lo, hi = 0, len(toks)
    ops = list(range(lo + 1, hi, 2))
    i = next((j for j in ops if toks[j] == "*"), ops[0])  # * before + -, leftmost first
    a, op, b = toks[i - 1], toks[i], toks[i + 1]
    c = OPS[op](a, b)
    rest, at = toks[:i - 1] + [c] + toks[i + 2:], i - 1
    if lo > 0 and hi - lo == 3:  # group is down to "(n)": drop the brackets
        rest, at = rest[:lo - 1] + [rest[lo]] + rest[lo + 2:], lo - 1
    return a, op, b, c, rest, at


def solve(expr):
    """One operation at a time: [(a, op, b, result, rest_tokens), ...]; the last result is the answer."""
    toks, steps = tokenize(expr), []
    while len(toks) > 1:
        a, op, b, c, toks, _ = first_step(toks)
        steps.append((a, op, b, c, list(toks)))
    return steps


def step_line(a, op, b, c, rest):
    """'8*3=24, so 7+24-5', or '31-5=26' for the last step."""
    line = f"{_num(a, True)}{op}{_num(b, False)}={c}"
    return line + (f", so {render(rest)}" if len(rest) > 1 else "")


def solution_lines(expr):
    """['8*3=24, so 7+24-5', '7+24=31, so 31-5', '31-5=26']"""
    return [step_line(*step) for step in solve(expr)]


def check_line(a, op, b, c):
    """The check of a step `a op b=c` as written, by substituting the result back (a computation of its own, so it
    can disagree): `c-b` must give a for a +, `c+b` must give a for a -, and `b*a` must give c for a * (no division
    in this world). -> (the check's computation, what it must give): ('24-8', 16) for `16+8=24`."""
    if op == "*":
        return f"{_num(b, True)}*{_num(a, False)}", c
    return f"{c}{'-' if op == '+' else '+'}{_num(b, False)}", a


def checked_lines(expr, rng, check_prob, slip_frac, check_slip_frac):
    """solution_lines with checks: each step is checked with probability check_prob (at least one is). A checked step
    is first written with a wrong result with probability slip_frac; else its check slips with probability
    check_slip_frac. A check that disagrees says so, and the step is worked again, which settles it: the slip is
    fixed, or the step stands and the check was wrong.
        ['8*3=21, so 7+21-5', 'Check: 3*8=24, not 21', '8*3=24, so 7+24-5', '7+24=31, so 31-5', 'Check: 31-24=7', ...]
    """
    n = len(solve(expr))
    checked = {k for k in range(n) if rng.random() < check_prob} or {rng.randrange(n)}
    lines, toks = [], tokenize(expr)
    for k in range(n):
        a, op, b, c, rest, at = first_step(toks)
        right, toks = step_line(a, op, b, c, rest), rest
        if k not in checked:
            lines.append(right)
            continue
        slip = rng.random() < slip_frac
        written = c + rng.choice([-10, -2, -1, 1, 2, 10]) if slip else c
        lines.append(step_line(a, op, b, written, rest[:at] + [written] + rest[at + 1:]))
        computation, must_give = check_line(a, op, b, written)
        gives = evaluate(computation)
        if not slip and rng.random() < check_slip_frac:
            gives += rng.choice([-10, -2, -1, 1, 2, 10])
        lines.append(f"Check: {computation}={gives}" + (f", not {must_give}" if gives != must_give else ""))
        if gives != must_give:
            lines.append(right)
    return lines


# a step line as step_line writes it, and a check's line as checked_lines writes it
_STEP = re.compile(r"(\(?-?\d+\)?)([-+*])(\(?-?\d+\)?)=(-?\d+)(?:, so [-+*()\d]+)?")
_CHECK = re.compile(r"Check: (\(?-?\d+\)?[-+*]\(?-?\d+\)?)=(-?\d+)(?:, not (-?\d+))?")


def _step(line):
    """A step line -> (a, op, b, c) as written, or None."""
    m = _STEP.fullmatch(line)
    return m and (int(m.group(1).strip("()")), m.group(2), int(m.group(3).strip("()")), int(m.group(4)))


def _step_right(step):
    a, op, b, c = step
    return OPS[op](a, b) == c


@dataclass(frozen=True)
class Check:
    """One check in a worked solution: the step line it checks, as written; the check's line; and, where the check
    disagreed, the same operation worked again on the line after it (None where it agreed, or nothing was redone)."""
    written: str
    check: str
    redone: str | None

    @property
    def disagreed(self):
        """The check's computation did not give what it must (`Check: 21-8=13, not 16`)."""
        return ", not " in self.check

    @property
    def changed(self):
        """The check changed the step: it disagreed, and the step worked again has another result."""
        return self.redone is not None and _step(self.redone)[3] != _step(self.written)[3]

    @property
    def fixed(self):
        """A slip caught and fixed: the step was written with a wrong result, and worked again it is right."""
        return self.changed and not _step_right(_step(self.written)) and _step_right(_step(self.redone))


def read_checks(text):
    """The checks in a completion, in order: each `Check: COMPUTATION=VALUE` line whose computation is check_line's
    for the step line right above it, with that step worked again below it if it says `, not N`. A line that only
    looks like one (no computation, no step above it, or the computation of another step) is not a check."""
    lines = [line.strip().removeprefix("<think>").strip() for line in text.split("\n")]
    checks = []
    for i, line in enumerate(lines):
        m, step = _CHECK.fullmatch(line), i > 0 and _step(lines[i - 1])
        if m and step and m.group(1) == check_line(*step)[0]:
            after = lines[i + 1] if i + 1 < len(lines) else ""
            again = _step(after) and _step(after)[:3] == step[:3]  # the same operation
            checks.append(Check(lines[i - 1], line, after if m.group(3) is not None and again else None))
    return checks


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
