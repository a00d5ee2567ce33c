"""Rule-based rewards for nanoR1.

DeepSeek-R1 trains on rewards computed by rules, not by a learned model (a neural
reward model invites reward hacking). A wrong reward silently trains the wrong
thing, so everything here is deliberately conservative:

* every function takes plain text and returns a float (or bool / str);
* nothing raises on arbitrary model output and nothing is slow on it: regexes are
  linear (no nested quantifiers), parsers cap input size and recursion depth, and
  powers are refused before they can explode (`9**9**9`);
* model-written code never runs in this process (see `code_reward`);
* equivalence errs toward "not equal" when unsure: a false positive teaches the
  model to be wrong, a false negative only wastes a sample.

Public API: extract_answer, is_equiv, accuracy_reward, format_reward,
language_consistency_reward, countdown_reward, code_reward, evaluate_arithmetic, REWARDS,
parse_reward_spec, combine_rewards / RewardFn, REQUIRED_FIELDS / rule_scored.
The one learned reward (R1 stage 4) is tasks.RewardModelScorer.
Only invalid *arguments* (bad mode, unknown language, bad spec) raise ValueError.
"""
from __future__ import annotations

import ast
import cmath
import functools
import math
import random
import re
from fractions import Fraction

import regex

from sandbox import SandboxError, run_python

MAX_ANSWER_CHARS = 1000  # longer answers are compared as plain strings only
MAX_TOKENS = 200  # expression parser: token cap
MAX_DEPTH = 40  # expression parser: nesting cap
MAX_BITS = 4000  # exact arithmetic: refuse numbers larger than 2**4000
N_POINTS = 6  # random evaluation points for algebraic equivalence
REL_TOL, ABS_TOL = 1e-6, 1e-9  # for inexact (irrational / complex) values


# ----------------------------------------------------------------------------
# Answer extraction. Convention (Qwen2.5-Math eval, open-r1): the LAST \boxed{}
# is the answer, because models that self-correct box more than once.
# Priority: <answer> tag > \boxed/\fbox > GSM8K "#### N" > "the answer is" > last number.
# ----------------------------------------------------------------------------
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BOX_BARE = re.compile(r" +([^\s$]{1,100})")  # "\boxed 5" (no braces)
_ANSWER_IS = re.compile(r"(?:final answer|the answer)\s*(?:is|:)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|(?<![\w.])-?\.\d+")


def _matching_braces(s: str) -> dict[int, int]:
    """Map each '{' index to the index of its '}' in one linear pass."""
    stack, match = [], {}
    for m in re.finditer(r"[{}]", s):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            match[stack.pop()] = m.start()
    return match


def _last_boxed(text: str) -> str | None:
    ends = [m.end() for m in _BOX.finditer(text)]
    match = None
    for j in reversed(ends):  # a truncated last box falls back to the previous one
        if text.startswith("{", j):
            match = match if match is not None else _matching_braces(text)
            if j in match:
                return text[j + 1 : match[j]].strip()
        else:
            m = _BOX_BARE.match(text, j)
            if m:
                return m.group(1)
    return None


def _last_tag(text: str, tag: str) -> str | None:
    """Content of the last complete <tag>...</tag>."""
    end = text.rfind(f"</{tag}>")
    start = text.rfind(f"<{tag}>", 0, max(end, 0))
    return text[start + len(tag) + 2 : end] if end >= 0 and start >= 0 else None


def _gsm8k(text: str) -> str | None:
    i = text.rfind("####")
    return text[i + 4 : i + 204].split("\n")[0].strip() if i >= 0 else None


def _last_match(pattern: re.Pattern, text: str):
    last = None
    for last in pattern.finditer(text):
        pass
    return last


def _answer_is(text: str) -> str | None:
    m = _last_match(_ANSWER_IS, text)
    tail = text[m.end() : m.end() + 300].split("\n")[0] if m else ""
    return _SENTENCE_END.split(tail)[0].strip(" :$") or None


def _last_number(text: str) -> str | None:
    m = _last_match(_NUMBER, text)
    return m.group() if m else None


def extract_answer(text) -> str | None:
    """The final answer in a completion (or in a gold solution), or None."""
    try:
        if not isinstance(text, str) or not text.strip():
            return None
        tag = _last_tag(text, "answer")
        if tag is not None:
            ans = _last_boxed(tag) or _answer_is(tag) or tag
            return ans.strip().rstrip(".").strip() or None
        for finder in (_last_boxed, _gsm8k, _answer_is, _last_number):
            ans = finder(text)
            if ans:
                return ans.strip().rstrip(".").strip() or None
        return None
    except Exception:
        return None


# ----------------------------------------------------------------------------
# Normalisation: map the many LaTeX spellings of an answer to one string.
# ----------------------------------------------------------------------------
_REPLACE = [  # order matters: longer / more specific spellings first
    ("\\left", ""), ("\\right", ""), ("\\displaystyle", ""), ("\\!", ""), ("\\,", ""),
    ("\\;", " "), ("\\:", " "), ("\\qquad", " "), ("\\quad", " "), ("\\ ", " "), ("~", " "),
    ("{,}", ","), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cdot", "*"),
    ("\\times", "*"), ("\\div", "/"), ("×", "*"), ("÷", "/"), ("−", "-"), ("\\$", ""),
    ("$", ""), ("\\%", "%"), ("^{\\circ}", ""), ("^\\circ", ""), ("\\circ", ""),
    ("\\degree", ""), ("°", ""), ("\\{", "\x01"), ("\\}", "\x02"), ("\\(", ""), ("\\)", ""),
    ("\\[", ""), ("\\]", ""), ("\\cup", "∪"), ("π", "\\pi "), ("√", "\\sqrt"),
]
_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|operatorname)\s*\{")
_UNIT_TEXT = re.compile(r"[A-Za-z .]{1,30}")
_UNIT_REST = re.compile(r"\s*(?:\^\{?[23]\}?)?\s*\.?")
_FRAC_SHORT = [
    (re.compile(r"\\frac(\d)(\d)"), r"\\frac{\1}{\2}"),
    (re.compile(r"\\frac(\d)\{"), r"\\frac{\1}{"),
    (re.compile(r"\\frac\{([^{}]{0,50})\}(\d)"), r"\\frac{\1}{\2}"),
    (re.compile(r"\\sqrt(\d)"), r"\\sqrt{\1}"),
]
_MIXED = [  # "2\frac{1}{3}" and "2 1/3" are mixed numbers when they are the whole answer
    re.compile(r"(-?)(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}"),
    re.compile(r"(-?)(\d+) (\d+)/(\d+)"),
]
_UNITS = set(
    "cm mm km meter meters metre metres inch inches feet foot ft yard yards mile miles mph "
    "kg mg gram grams lb lbs pound pounds ounce ounces oz sec second seconds min minute minutes "
    "hr hrs hour hours day days week weeks month months year years dollar dollars cent cents "
    "unit units degree degrees sq square cubic liter liters litre litres ml kmh".split()
)
_ASSIGN = re.compile(r"(?:[A-Za-z](?:_\{?\w{1,5}\}?)?|\\[A-Za-z]+)\s*(?:=|\\in(?![A-Za-z]))\s*")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _normalize(s: str) -> str:
    s = s.strip()
    if len(s) > MAX_ANSWER_CHARS:
        return s
    m = _BOX.match(s)
    if m and _matching_braces(s).get(m.end()) == len(s) - 1:
        s = s[m.end() + 1 : -1]
    for old, new in _REPLACE:
        s = s.replace(old, new)
    for _ in range(20):  # \text{..}: trailing unit text is dropped, anything else unwrapped
        m = _WRAPPER.search(s)
        close = _matching_braces(s).get(m.end() - 1) if m else None
        if close is None:
            break
        inner, rest = s[m.end() : close], s[close + 1 :]
        if s[: m.start()].strip() and _UNIT_TEXT.fullmatch(inner) and _UNIT_REST.fullmatch(rest):
            s = s[: m.start()]
        else:
            s = s[: m.start()] + inner + rest
    for pattern, repl in _FRAC_SHORT:
        s = pattern.sub(repl, s)
    s = " ".join(s.split()).rstrip(".").strip()
    for pattern in _MIXED:
        m = pattern.fullmatch(s)
        if m:
            s = f"{m[1]}({m[2]}+{m[3]}/{m[4]})"
    return s


def _strip_units(s: str) -> str:
    for _ in range(2):  # e.g. "5 sq ft"
        t = re.sub(r"\^\{?[23]\}?$", "", s)
        j = len(t)
        while j and t[j - 1].isascii() and t[j - 1].isalpha():
            j -= 1
        head = t[:j].rstrip()
        if t[j:].lower() not in _UNITS or not head or not (head[-1].isdigit() or head[-1] in ")}"):
            break
        s = head
    return s


@functools.lru_cache(maxsize=4096)
def _canon(s: str) -> str:
    s = _normalize(s)
    if len(s) > MAX_ANSWER_CHARS:
        return s
    m = _ASSIGN.match(s)  # "x = 3" -> "3" (only a single leading assignment)
    if m and "=" not in s[m.end() :]:
        s = s[m.end() :]
    s = _strip_units(s)
    return s.replace(",", "") if _THOUSANDS.fullmatch(s) else s


# ----------------------------------------------------------------------------
# Safe expression parser (recursive descent, never eval). Numbers are exact
# Fractions; variables are single letters or Greek names. Used for math
# equivalence and for Countdown.
# ----------------------------------------------------------------------------
_TOKEN = re.compile(
    r"\s*(?:(\d+(?:\.\d*)?|\.\d+)([eE][-+]?\d+)?|(\\[A-Za-z]+)|([A-Za-z]+)|(\*\*|[-+*/^()\[\]{}!]))"
)
_FUNCS = {"sin": cmath.sin, "cos": cmath.cos, "tan": cmath.tan, "ln": cmath.log, "log": cmath.log10, "exp": cmath.exp}
_CONSTS = {"pi": complex(math.pi), "e": complex(math.e), "i": 1j}
_GREEK = set("alpha beta gamma delta epsilon varepsilon zeta eta theta lambda mu nu xi rho sigma tau phi varphi chi psi omega".split())


class _ParseError(Exception):
    pass


class _Inexact(Exception):
    """Exact (Fraction) evaluation is impossible; fall back to complex floats."""


_KIND = {**dict.fromkeys(_FUNCS, "func"), **dict.fromkeys(_CONSTS, "const"), **dict.fromkeys(_GREEK, "var"),
         "frac": "frac", "sqrt": "sqrt"}


def _tokenize(s: str, arith: bool) -> list:
    toks, pos, s = [], 0, s.strip()
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if not m:
            raise _ParseError(s[pos : pos + 10])
        pos = m.end()
        num, exp, cmd, word, op = m.groups()
        if num is not None:
            if len(num) > 60 or (exp and abs(int(exp[1:])) > 300):
                raise _ParseError("number too large")
            toks.append(("num", Fraction(num) * Fraction(10) ** int(exp[1:] if exp else 0)))
        elif op is not None:
            toks.append(("op", "^" if op == "**" else op))
        elif arith:
            raise _ParseError("only numbers and + - * / ( ) are allowed")
        elif (cmd or word).lstrip("\\") in _KIND:
            name = (cmd or word).lstrip("\\")
            toks.append((_KIND[name], name))
        elif word and len(word) <= 2:  # "xy" is x*y; longer unknown words are text, not algebra
            toks.extend(("const" if ch in "ei" else "var", ch) for ch in word)
        else:
            raise _ParseError(cmd or word)
        if len(toks) > MAX_TOKENS:
            raise _ParseError("too many tokens")
    return toks + [("end", None)]


class _Parser:
    """Recursive descent; precedence from low to high:
    expr := term (+|- term)*          term := unary ((*|/) unary | implicit power)*
    unary := (+|-) unary | power      power := primary !* (^ unary)?
    In `arith` mode (Countdown) only numbers, + - * / and parentheses exist."""

    def __init__(self, toks: list, arith: bool):
        self.toks, self.i, self.depth, self.arith = toks, 0, 0, arith

    def peek(self, *wanted) -> bool:
        return self.toks[self.i] in [("op", w) for w in wanted]

    def take(self, wanted=None):
        tok = self.toks[self.i]
        if tok[0] == "end" or (wanted and tok != ("op", wanted)):
            raise _ParseError(f"expected {wanted or 'more input'}")
        self.i += 1
        return tok

    def nested(self, method):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _ParseError("too deeply nested")
        node = method()
        self.depth -= 1
        return node

    def expr(self):
        terms = [(1, self.term())]
        while self.peek("+", "-"):
            terms.append((1 if self.take()[1] == "+" else -1, self.term()))
        return terms[0][1] if len(terms) == 1 else ("sum", terms)

    def term(self):
        factors = [(False, self.unary())]
        while True:
            kind, val = self.toks[self.i]
            if self.peek("*", "/"):
                self.take()
                factors.append((val == "/", self.unary()))
            elif not self.arith and (kind in ("var", "const", "func", "frac", "sqrt") or self.peek("(", "{")):
                factors.append((False, self.power()))  # implicit product: 2x, 2\pi, (x+1)(x-1)
            else:
                return factors[0][1] if len(factors) == 1 else ("prod", factors)

    def unary(self):
        if self.peek("+", "-"):
            sign = self.take()[1]
            node = self.nested(self.unary)
            return ("neg", node) if sign == "-" else node
        return self.power()

    def power(self):
        node = self.nested(self.primary)
        while not self.arith and self.peek("!"):
            self.take()
            node = ("fact", node)
        if not self.arith and self.peek("^"):
            self.take()
            return ("pow", node, self.unary())
        return node

    def primary(self):
        kind, val = self.take()
        if kind in ("num", "var", "const"):
            return (kind, val)
        if (kind, val) in (("op", "("), ("op", "{")):
            node = self.expr()
            self.take(")" if val == "(" else "}")
            return node
        if kind == "frac":
            return ("prod", [(False, self.nested(self.primary)), (True, self.nested(self.primary))])
        if kind == "sqrt":  # \sqrt{x}, \sqrt[n]{x}: a power with exponent 1/n
            index = ("num", Fraction(2))
            if self.peek("["):
                self.take()
                index = self.expr()
                self.take("]")
            return ("pow", self.nested(self.primary), ("prod", [(False, ("num", Fraction(1))), (True, index)]))
        if kind == "func":
            return ("fn", val, self.nested(self.primary))
        raise _ParseError(f"unexpected {val}")


def _parse(s: str, arith: bool = False):
    """(tree, set of variable names); raises on anything it does not understand."""
    parser = _Parser(_tokenize(s, arith), arith)
    tree = parser.expr()
    if parser.toks[parser.i][0] != "end":
        raise _ParseError("trailing input")
    return tree, {v for k, v in parser.toks if k == "var"}


def _iroot(n: int, q: int) -> int | None:
    if n.bit_length() > 1000:
        return None
    r = math.isqrt(n) if q == 2 else round(n ** (1.0 / q))
    return next((c for c in (r - 1, r, r + 1) if c >= 0 and c**q == n), None)


def _pow(a, b, exact: bool):
    if exact:
        if b.denominator != 1:  # exact only for perfect roots: \sqrt{4}, 8^{2/3}
            q = b.denominator
            if a < 0 or q > 12:
                raise _Inexact
            rn, rd = _iroot(a.numerator, q), _iroot(a.denominator, q)
            if rn is None or rd is None:
                raise _Inexact
            a, b = Fraction(rn, rd), Fraction(b.numerator)
        n = b.numerator
        if a == 0:
            if n < 0:
                raise ZeroDivisionError
            return Fraction(int(n == 0))
        if abs(n) * max(a.numerator.bit_length(), a.denominator.bit_length(), 1) > MAX_BITS:
            raise _Inexact  # refuse before computing: 9^(9^9) never gets evaluated
        return a**n
    if a == 0:
        if b.real > 0:
            return 0j
        raise ZeroDivisionError
    if abs(b) > 1e4 or abs(b) * (abs(math.log(abs(a))) + abs(cmath.phase(a))) > 600:
        raise OverflowError
    return a**b


def _ev(node, env, exact: bool):
    """Evaluate a tree: exact Fractions (raises _Inexact when impossible) or complex."""
    kind = node[0]
    if kind == "num":
        return node[1] if exact else complex(node[1])
    if kind in ("var", "const", "fn") and exact:
        raise _Inexact
    if kind == "var":
        return env[node[1]]
    if kind == "const":
        return _CONSTS[node[1]]
    if kind == "neg":  # 0 - x, not -x: -(4+0j) has imag -0.0, which flips sqrt's branch
        return 0 - _ev(node[1], env, exact)
    if kind == "fn":
        out = _FUNCS[node[1]](_ev(node[2], env, exact))
    elif kind == "pow":
        out = _pow(_ev(node[1], env, exact), _ev(node[2], env, exact), exact)
    elif kind == "fact":
        x = _ev(node[1], env, exact)
        if exact and (x.denominator != 1 or not 0 <= x <= 170):
            raise _Inexact
        if not exact and (x.imag != 0 or x.real != int(x.real) or not 0 <= x.real <= 170):
            raise ValueError("factorial domain")
        out = math.factorial(int(x.real))
        out = Fraction(out) if exact else complex(out)
    else:  # sum / prod
        out = Fraction(kind == "prod") if exact else complex(kind == "prod")
        for flag, child in node[1]:
            v = _ev(child, env, exact)
            if kind == "sum":
                out = out + v if flag > 0 else out - v
            else:
                out = out / v if flag else out * v
            if exact and max(out.numerator.bit_length(), out.denominator.bit_length()) > MAX_BITS:
                raise _Inexact
    if not exact and not cmath.isfinite(out):
        raise OverflowError
    return out


@functools.lru_cache(maxsize=4096)
def _point(name: str, k: int) -> complex:
    rng = random.Random(f"nanoR1/{name}/{k}")  # fixed seed: same point for both sides
    return complex(rng.uniform(0.5, 2.5), rng.uniform(-0.5, 0.5))


@functools.lru_cache(maxsize=4096)
def _value(s: str):
    """Exact Fraction for rational constants, else a tuple of complex values at
    N_POINTS fixed points (None where evaluation failed); None if unparseable."""
    try:
        tree, names = _parse(s)
    except Exception:
        return None
    if not names:
        try:
            return _ev(tree, None, True)
        except _Inexact:
            pass
        except Exception:
            return None
    out = []
    for k in range(N_POINTS if names else 1):
        try:
            out.append(_ev(tree, {n: _point(n, k) for n in names}, False))
        except Exception:
            out.append(None)
    return tuple(out) * (1 if names else N_POINTS)


def _same_value(a, b) -> bool:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    a = a if isinstance(a, tuple) else (complex(a),) * N_POINTS
    b = b if isinstance(b, tuple) else (complex(b),) * N_POINTS
    good = 0
    for x, y in zip(a, b):
        if x is None or y is None:
            if x is not y:
                return False
            continue
        if abs(x - y) > REL_TOL * max(abs(x), abs(y)) + ABS_TOL:
            return False
        good += 1
    return good >= N_POINTS // 2


# ----------------------------------------------------------------------------
# Equivalence: string match, multiple choice, tuples / intervals / sets, then
# numeric or algebraic comparison.
# ----------------------------------------------------------------------------
_GOLD_CHOICE = re.compile(r"\(?([A-J])\)?")
_PRED_CHOICE = re.compile(r"(?:(?i:option|choice|answer) ?:? ?)?\(?([A-Ja-j])(?:[).:]|\s|$)")
_OTHER_CHOICE = re.compile(r"(?<![A-Za-z])[A-J](?![A-Za-z])")
_OPEN, _CLOSE = "([{\x01", ")]}\x02"


def _split_top(s: str, sep: str) -> list[str]:
    parts, depth, last = [], 0, 0
    for i, c in enumerate(s):
        depth += (c in _OPEN) - (c in _CLOSE)
        if c == sep and depth == 0:
            parts.append(s[last:i])
            last = i + 1
    return parts + [s[last:]]


def _brackets(s: str):
    """(open, inside, close) when s is one bracketed tuple/interval/set, else None."""
    if len(s) < 2 or s[0] not in "([\x01" or s[-1] not in ")]\x02":
        return None
    depth = 0
    for i, c in enumerate(s):
        depth += (c in _OPEN) - (c in _CLOSE)
        if depth == 0 and i < len(s) - 1:
            return None
    inside = s[1:-1]
    if s[0] != "\x01" and len(_split_top(inside, ",")) < 2:
        return None  # "(5)" is just a parenthesised number
    return s[0], inside, s[-1]


def _match_lists(ps, gs, ordered: bool, budget: list) -> bool:
    if len(ps) != len(gs) or len(gs) > 20:
        return False
    if ordered:
        return all(_equiv(p, g, budget) for p, g in zip(ps, gs))
    unused = list(ps)
    for g in gs:
        hit = next((k for k, p in enumerate(unused) if _equiv(p, g, budget)), None)
        if hit is None:
            return False
        unused.pop(hit)
    return True


def _scalar_equiv(p: str, g: str) -> bool:
    p_pct, g_pct = p.endswith("%"), g.endswith("%")
    vp, vg = _value(p.rstrip("%").strip()), _value(g.rstrip("%").strip())
    if vp is None or vg is None:
        return False
    scale = Fraction(1, 100)
    p_alts = [vp] + ([vp * scale if isinstance(vp, Fraction) else tuple(x * 0.01 if x is not None else None for x in vp)] if p_pct else [])
    g_alts = [vg] + ([vg * scale if isinstance(vg, Fraction) else tuple(x * 0.01 if x is not None else None for x in vg)] if g_pct else [])
    return any(_same_value(a, b) for a in p_alts for b in g_alts)


def _equiv(pred: str, gold: str, budget: list) -> bool:
    budget[0] -= 1  # caps the work on nested tuples of sets of tuples ...
    p, g = _canon(pred), _canon(gold)
    if not p or not g or budget[0] < 0:
        return False
    if p.replace(" ", "") == g.replace(" ", "") or (len(g) > 2 and g.isalpha() and p.lower() == g.lower()):
        return True
    if len(p) > MAX_ANSWER_CHARS or len(g) > MAX_ANSWER_CHARS:
        return False
    m = _GOLD_CHOICE.fullmatch(g)
    if m:  # multiple choice: "B", "(B)", "B) 42", "Option B"
        c = _PRED_CHOICE.match(p)  # hedging ("A or B") names a second letter: wrong
        return bool(c) and c.group(1).upper() == m.group(1) and not _OTHER_CHOICE.search(p, c.end())
    for sep in ("∪", ","):  # unions and bare lists ("1, 2"): order-free
        ps, gs = _split_top(p, sep), _split_top(g, sep)
        if len(ps) > 1 or len(gs) > 1:
            return _match_lists(ps, gs, False, budget)
    bp, bg = _brackets(p), _brackets(g)
    if bp or bg:  # tuples/intervals keep order and bracket kinds; sets \{..\} do not
        if not (bp and bg) or (bp[0], bp[2]) != (bg[0], bg[2]):
            return False
        return _match_lists(_split_top(bp[1], ","), _split_top(bg[1], ","), bp[0] != "\x01", budget)
    return _scalar_equiv(p, g)


def is_equiv(pred, gold) -> bool:
    """True when the predicted answer equals the gold answer mathematically."""
    try:
        if pred is None or gold is None:
            return False
        return _equiv(str(pred), str(gold), [500])
    except Exception:
        return False


# ----------------------------------------------------------------------------
# Rewards on a completion.
# ----------------------------------------------------------------------------
def answer_part(completion: str) -> str:
    """The text after the last </think>, or the whole completion when there is none: the answer is what
    the model gives after thinking, not what it considered on the way."""
    i = completion.rfind("</think>")
    return completion[i + len("</think>") :] if i >= 0 else completion


def accuracy_reward(completion: str, answer) -> float:
    """1.0 if the completion's final answer matches `answer`, else 0.0.
    Only the text after the last </think> is searched when there is one (the
    answer must be given, not merely thought of). A gold solution in GSM8K
    ("... #### 72") or boxed form is reduced to its final answer first."""
    try:
        gold = str(answer)
        if "####" in gold or _BOX.search(gold):
            gold = extract_answer(gold) or gold
        pred = extract_answer(answer_part(completion))
        return float(pred is not None and is_equiv(pred, gold))
    except Exception:
        return 0.0


def format_reward(completion: str, mode: str = "strict", think_in_prompt: bool = False) -> float:
    """R1 format reward, 1.0 or 0.0.
    strict:     <think>reasoning</think>answer, exactly one of each tag, both parts non-empty.
    soft:       a <think> ... </think> pair appears in that order (anything around it).
    answer_tag: the R1-Zero template, <think>...</think> <answer>...</answer> and nothing after.
    think_in_prompt=True: the prompt already ends with "<think>\\n" (R1-Distill chat
    template), so the completion starts inside the think block; a "<think>" is
    implied in front of it (a second one written by the model is a format error).
    A multi-turn tool-use completion (what the model wrote, its turns ended by
    <|im_end|>: Completion.text) is well formed either way a chat template renders
    it: one think block around its calls, closed in the last turn (a template with
    no reasoning of its own, as the tiny world's), or every turn thinking on its
    own, then calling or answering (Qwen3's template renders a <think> per turn)."""
    if mode not in ("strict", "soft", "answer_tag"):
        raise ValueError(f"format_reward mode must be 'strict', 'soft' or 'answer_tag', got {mode!r}")
    one_block = _format_reward(completion, mode, think_in_prompt)
    if one_block or not isinstance(completion, str):
        return one_block
    turns = completion.removesuffix("<|im_end|>").split("<|im_end|>")  # (a kept stop string ends the last turn)
    if len(turns) == 1:
        return one_block
    return min(_format_reward(turn, mode, think_in_prompt) for turn in turns)


def _format_reward(completion, mode, think_in_prompt):
    try:
        text = ("<think>" + completion) if think_in_prompt else completion.lstrip()
        if mode == "soft":
            i = text.find("<think>")
            return float(i >= 0 and text.find("</think>", i) >= 0)
        tags = ["<think>", "</think>"] + (["<answer>", "</answer>"] if mode == "answer_tag" else [])
        if not text.startswith("<think>") or any(text.count(t) != 1 for t in tags):
            return 0.0
        think, _, rest = text[7:].partition("</think>")
        if mode == "answer_tag":
            rest = rest.strip()
            if not (rest.startswith("<answer>") and rest.endswith("</answer>")):
                return 0.0
            rest = rest[8:-9]
        return float(bool(think.strip()) and bool(rest.strip()))
    except Exception:
        return 0.0


# Language consistency (DeepSeek-R1 paper, arXiv 2501.12948, sec. 2.3.2): "the
# proportion of target language words in the CoT", added to the accuracy reward
# to stop language mixing. A word is a run of letters of one script, except that
# each Han / kana character counts as one word. LaTeX commands are ignored.
_WORD = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}]|[^\W\d_\p{Han}\p{Hiragana}\p{Katakana}]+")
_LATEX_CMD = regex.compile(r"\\[A-Za-z]+")
_SCRIPTS = {lang: regex.compile(pattern) for lang, pattern in {
    **dict.fromkeys(["en", "fr", "de", "es", "it", "pt", "nl", "vi", "id"], r"\p{Latin}"),
    "zh": r"\p{Han}", "ja": r"[\p{Han}\p{Hiragana}\p{Katakana}]", "ko": r"\p{Hangul}",
    "ru": r"\p{Cyrillic}", "uk": r"\p{Cyrillic}", "el": r"\p{Greek}", "ar": r"\p{Arabic}",
    "he": r"\p{Hebrew}", "hi": r"\p{Devanagari}", "th": r"\p{Thai}",
}.items()}


def language_consistency_reward(completion: str, lang: str = "en") -> float:
    """Fraction in [0, 1] of the chain-of-thought words written in `lang`'s script.
    The CoT is the text inside <think>...</think> (or before </think>, or after an
    unclosed <think>, or the whole completion without tags). Empty CoT -> 0.0."""
    if lang not in _SCRIPTS:
        raise ValueError(f"unsupported language {lang!r}; supported: {', '.join(sorted(_SCRIPTS))}")
    try:
        start = completion.find("<think>")
        end = completion.find("</think>", max(start, 0))
        cot = completion[start + 7 if start >= 0 else 0 : end if end >= 0 else len(completion)]
        words = _WORD.findall(_LATEX_CMD.sub(" ", cot))
        if not words:
            return 0.0
        target = _SCRIPTS[lang]
        return sum(1 for w in words if target.match(w)) / len(words)
    except Exception:
        return 0.0


def countdown_reward(completion: str, numbers, target) -> float:
    """Countdown (TinyZero-style): 1.0 iff the final expression (last <answer> tag,
    else last \\boxed) uses each given number exactly once, only + - * / and
    parentheses, and evaluates exactly (Fractions) to `target`."""
    try:
        expr = _last_tag(completion, "answer")
        expr = _last_boxed(completion) if expr is None else expr
        if expr is None or len(expr) > MAX_ANSWER_CHARS:
            return 0.0
        for old, new in _REPLACE:
            expr = expr.replace(old, new)
        tree, _ = _parse(expr.split("=")[0], arith=True)  # "(1+2)*3 = 9" -> left side

        def leaves(node):
            if node[0] == "num":
                return [node[1]]
            kids = [c for _, c in node[1]] if isinstance(node[1], list) else [node[1]]
            return [x for k in kids for x in leaves(k)]

        if sorted(leaves(tree)) != sorted(Fraction(n) for n in numbers):
            return 0.0
        return float(_ev(tree, None, True) == Fraction(target))
    except Exception:
        return 0.0


def evaluate_arithmetic(expr: str) -> Fraction:
    """The exact value of an expression of numbers, + - * / and parentheses, by the parser above (never eval):
    ValueError if it is not one (or too large), ZeroDivisionError on a division by zero. The calculator tool."""
    try:
        tree, _ = _parse(expr, arith=True)
        return _ev(tree, None, True)
    except (_ParseError, _Inexact) as e:
        raise ValueError(str(e) or "number too large") from None


_EQUATION = regex.compile(r"^\s*([-+*/() \d.]+?)\s*=\s*(-?\d+(?:\.\d+)?)\s*(?:,\s*so\s+([-+*/() \d.]+?))?\s*$")


def steps_reward(completion: str) -> float:
    """Process reward for worked arithmetic: the fraction in [0, 1] of the reasoning's equation lines that are
    right. Lines are the tiny task's one-operation steps, `EXPR=VALUE` or `EXPR=VALUE, so REST` (`8*3=24, so
    7+24-5`); a line is right when EXPR evaluates to VALUE and its REST keeps the value of the previous line's
    REST (nothing was miscopied). No equation at all scores 0. Exact (Fractions), never eval().
    Why, next to accuracy: with outcome reward alone a third of the tiny model's correct samples reach the answer
    through a wrong step (`6*11=60` ...) and GRPO reinforces the wrong arithmetic with them; per-step credit
    also tells a sample with three right steps from one with none."""
    try:
        i = completion.find("</think>")
        reasoning = completion[:i] if i >= 0 else completion
        right = total = 0
        previous = None  # value of the last REST seen
        for line in reasoning.replace("<think>", "\n").splitlines():
            if len(line) > MAX_ANSWER_CHARS:
                return 0.0
            m = _EQUATION.match(line)
            if not m:
                continue
            expr, value, rest = m.groups()
            total += 1
            ok = _ev(_parse(expr, arith=True)[0], None, True) == Fraction(value)
            if rest is not None:
                rest_value = _ev(_parse(rest, arith=True)[0], None, True)
                ok = ok and (previous is None or rest_value == previous)
                previous = rest_value
            elif previous is not None:
                ok = ok and Fraction(value) == previous
            right += ok
        return right / total if total else 0.0
    except Exception:
        return 0.0


# ----------------------------------------------------------------------------
# Code: model-written code never runs in this process; sandbox.run_python runs it
# (its own process, kernel limits, namespaces, the nobody user; see sandbox.py).
# ----------------------------------------------------------------------------
def _extract_code(completion: str) -> str:
    """After the last </think> (if any): the last ```python / ```py / bare ```
    fenced block, else all of that text."""
    text = answer_part(completion)
    for block in reversed(text.split("```")[1:-1:2]):  # odd pieces lie inside complete fences
        first, _, body = block.partition("\n")
        if first.strip().lower() in ("", "python", "py", "python3"):
            return body
    return text


def code_reward(completion: str, tests, timeout: float = 5.0, memory_mb: int = 1024) -> float:
    """Fraction of `tests` (Python statements, usually asserts) that pass after
    running the completion's code in a sandboxed subprocess. 0.0 on syntax error,
    crash, timeout or anything unexpected. Returns within about `timeout` s."""
    try:
        code = _extract_code(completion)
        tests = [tests] if isinstance(tests, str) else [str(t) for t in tests]
        if not code.strip() or not tests:
            return 0.0
        try:
            ast.parse(code)  # cheap syntax check; parsing is not executing
        except Exception:
            return 0.0
        run = run_python(code, tests, timeout, memory_mb)
        return 0.0 if run.error == "timeout" else min(max(run.passed, 0), len(tests)) / len(tests)
    except SandboxError:
        raise
    except Exception:
        return 0.0


# ----------------------------------------------------------------------------
# Combining rewards: `--rewards=accuracy:1,format:0.5,language:0.2`. Every reward
# is a function (completion, example) -> float, where `example` is the dataset
# row. A missing field in the row raises KeyError: bad data must be loud.
# ----------------------------------------------------------------------------
REWARDS = {
    "accuracy": lambda c, ex: accuracy_reward(c, ex["answer"]),
    "format": lambda c, ex: format_reward(c, "strict", ex.get("think_in_prompt", False)),
    "format_soft": lambda c, ex: format_reward(c, "soft", ex.get("think_in_prompt", False)),
    "format_answer": lambda c, ex: format_reward(c, "answer_tag", ex.get("think_in_prompt", False)),
    "language": lambda c, ex: language_consistency_reward(c, ex.get("lang", "en")),
    "countdown": lambda c, ex: countdown_reward(c, ex["numbers"], ex["target"]),
    "steps": lambda c, ex: steps_reward(c),
    "code": lambda c, ex: code_reward(c, ex["tests"], ex.get("timeout", 5.0)),
}


def parse_reward_spec(spec: str) -> dict[str, float]:
    """"accuracy:1,format:0.5" -> {"accuracy": 1.0, "format": 0.5}; a bare name has weight 1."""
    weights = {}
    for item in str(spec).split(","):
        name, sep, weight = item.partition(":")
        name = name.strip()
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r} in {spec!r}; valid rewards: {', '.join(REWARDS)}")
        try:
            value = float(weight) if sep else 1.0
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or name in weights:
            raise ValueError(f"malformed reward spec {spec!r} at {item.strip()!r}: expected name:weight pairs, each name once")
        weights[name] = value
    return weights


class RewardFn:
    """Weighted sum of named rewards: fn(completion, example) -> (total, parts),
    where `parts` holds each unweighted reward so it can be logged separately."""

    def __init__(self, weights: dict[str, float]):
        for name in weights:
            if name not in REWARDS:
                raise ValueError(f"unknown reward {name!r}; valid rewards: {', '.join(REWARDS)}")
        self.weights = {name: float(w) for name, w in weights.items()}

    def __call__(self, completion: str, example: dict) -> tuple[float, dict[str, float]]:
        parts = {name: float(REWARDS[name](completion, example)) for name in self.weights}
        return sum(self.weights[n] * v for n, v in parts.items()), parts


def combine_rewards(spec) -> RewardFn:
    """RewardFn from a spec string ("accuracy:1,format:0.5") or a {name: weight} dict."""
    return RewardFn(parse_reward_spec(spec) if isinstance(spec, str) else dict(spec))


# the row fields each rule reward reads; with --reward_model, a row carrying none of RULE_FIELDS goes to the RM
REQUIRED_FIELDS = {"accuracy": ("answer",), "countdown": ("numbers", "target"), "code": ("tests",)}
RULE_FIELDS = ("answer", "tests", "numbers", "target")


def rule_scored(row):
    """Whether the rule rewards score this row (it carries something to check); else, with --reward_model, the RM."""
    return any(f in row for f in RULE_FIELDS)
