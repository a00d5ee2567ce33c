"""The docs' commands still match the code. Every `python SCRIPT.py ...` and `torchrun ... SCRIPT.py ...` in the code
blocks (and inline code) of README.md, docs/*.md and the READMEs under data/ and bench/, and in the header comments
of config/*.py, is checked without running anything: the script exists, every config file it names exists, and every
argument is one the script takes, with a value of the right type. A flag renamed in code fails here until the docs
follow.

How a script's arguments are checked, by the way it reads them:
- train_grpo.py, train_sft.py, distill.py: their own `configure(argv)` (configurator.parse_overrides plus the script's
  checks of choices and ranges; recipes are read with configurator.read_recipe, never executed);
- sample.py: configurator.parse_overrides(argv, CONFIG);
- data/prepare_*.py, bench/*.py (argparse): the script's own parser, caught at its parse_args call inside main();
- anything else (plot.py): positional arguments only.
Placeholders are fine where a string goes (`--init_from=/models/Qwen2.5-1.5B`, `--data=FILE.jsonl`), and a bare
`...` stands for "more flags" and is skipped. torchrun's own options (before the script) are torchrun's business.
"""
import argparse
import contextlib
import functools
import glob
import importlib
import importlib.util
import io
import os
import re
import shlex
import sys
from unittest import mock

import pytest

from configurator import parse_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(glob.glob("docs/*.md", root_dir=ROOT)), "bench/README.md",
        *sorted(glob.glob("data/**/README.md", root_dir=ROOT, recursive=True))]
USER_DOCS = [d for d in DOCS if d != "bench/README.md"]  # bench/README.md is a log of runs: each one's commit and box
RECIPES = sorted(glob.glob("config/*.py", root_dir=ROOT))
SEPARATORS = {";", "&&", "||", "|", "&"}


def _read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


# -----------------------------------------------------------------------------
# finding the commands


def code_blocks(markdown):
    """The shell text of a markdown file, as blocks of (line number, text): each fenced code block, and each inline
    code span that starts with `python ` or `torchrun `."""
    blocks, fenced = [], None
    for i, line in enumerate(markdown.splitlines(), 1):
        if line.lstrip().startswith("```") and fenced is None:
            fenced = []
        elif line.lstrip().startswith("```"):
            blocks.append(fenced)
            fenced = None
        elif fenced is not None:
            fenced.append((i, line))
        else:
            blocks += [[(i, span)] for span in re.findall(r"`([^`]+)`", line) if span.startswith(("python ", "torchrun "))]
    return blocks


def recipe_header_blocks(text):
    """The commands of a config/*.py header (its leading comment lines), one block each, without the `#`."""
    blocks = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.startswith("#"):
            break
        if line[1:].strip().startswith(("python ", "torchrun ")):
            blocks.append([(i, line[1:])])
    return blocks


def shell_lines(block):
    """(first line number, tokens) per logical shell line of a block: `\\` continuations and quotes over several
    lines joined, comments dropped (a quote left open at the end of the block: the rest is not shell)."""
    out, start, buf = [], None, ""
    for i, line in block:
        start = i if start is None else start
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        try:
            lexer = shlex.shlex(buf, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            tokens = list(lexer)
        except ValueError:  # a quote still open: the string goes on on the next line
            buf += "\n"
            continue
        out.append((start, tokens))
        start, buf = None, ""
    return out


def commands(blocks):
    """(line number, script, args) for every python/torchrun command of a script file in these blocks."""
    out = []
    for lineno, tokens in [line for block in blocks for line in shell_lines(block)]:
        segment = []
        for tok in tokens + [";"]:
            if tok not in SEPARATORS:
                segment.append(tok)
                continue
            while segment and (re.fullmatch(r"\w+=.*", segment[0]) or segment[0] in ("do", "then", "time")):
                segment.pop(0)  # VAR=value prefixes, loop and timing keywords
            if segment and segment[0] in ("python", "python3") and len(segment) > 1 and segment[1].endswith(".py"):
                out.append((lineno, segment[1], segment[2:]))
            elif segment and segment[0] == "torchrun":
                at = next((k for k, t in enumerate(segment) if t.endswith(".py") and not t.startswith("-")), None)
                if at is not None:  # `torchrun ... train_sft.py` with no script named is prose, not a command
                    out.append((lineno, segment[at], segment[at + 1:]))
            segment = []
    return out


def doc_commands():
    found = []
    for rel in DOCS:
        found += [(f"{rel}:{n}", script, args) for n, script, args in commands(code_blocks(_read(rel)))]
    for rel in RECIPES:
        found += [(f"{rel}:{n}", script, args) for n, script, args in commands(recipe_header_blocks(_read(rel)))]
    return found


# -----------------------------------------------------------------------------
# checking one command


class _Parser(Exception):
    def __init__(self, parser):
        super().__init__()
        self.parser = parser


def _hand_over(parser, *args, **kwargs):
    """Stands in for ArgumentParser.parse_args: gives the parser to _argparse_parser instead of parsing."""
    raise _Parser(parser)


def _module(script):
    """The script imported as a module (nothing at its `if __name__ == "__main__"` runs)."""
    if "/" not in script:
        return importlib.import_module(script[:-3])
    if script.startswith("data/"):
        return importlib.import_module(script[:-3].replace("/", "."))
    path = os.path.join(ROOT, script)  # bench/NAME.py imports its sibling bench/common.py by name
    spec = importlib.util.spec_from_file_location(script[:-3].replace("/", "_"), path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(path))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(os.path.dirname(path))
    return mod


def _argparse_parser(mod):
    """The argparse parser mod.main() builds, taken at its parse_args call (so main's work never starts), or None."""
    if not hasattr(mod, "main"):
        return None
    with mock.patch.object(argparse.ArgumentParser, "parse_args", _hand_over):
        try:
            mod.main()
        except _Parser as got:
            got.parser.allow_abbrev = False  # `--thread=1` must not pass for `--threads`
            got.parser.prog = os.path.relpath(mod.__file__, ROOT)
            return got.parser
    return None


def _no_flags(argv):
    flags = [a for a in argv if a.startswith("-")]
    if flags:
        raise SystemExit(f"takes no options, got {' '.join(flags)}")


@functools.lru_cache(maxsize=None)
def argument_checker(script):
    """A function argv -> None that raises SystemExit, as the script would, on an argument the script refuses."""
    mod = _module(script)
    if hasattr(mod, "configure"):
        return mod.configure
    if isinstance(getattr(mod, "CONFIG", None), dict):
        return lambda argv: parse_overrides(argv, mod.CONFIG)
    parser = _argparse_parser(mod)
    return parser.parse_args if parser is not None else _no_flags


def problems(script, args):
    """What is wrong with `python script args...` (an empty list: nothing)."""
    if not os.path.isfile(os.path.join(ROOT, script)):
        return [f"{script}: no such script"]
    args = [a for a in args if a != "..."]
    missing = [a for a in args if a.endswith(".py") and not a.startswith("-") and not os.path.isfile(
        os.path.join(ROOT, a))]
    if missing:
        return [f"{a}: no such config file" for a in missing]
    err = io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)  # recipes are named relative to the repo root
    try:
        with contextlib.redirect_stderr(err):
            argument_checker(script)(args)
    except SystemExit as e:
        # configurator's message is the exit code; argparse's is on stderr and starts with the script's name
        return [f"{script}: {e.code}" if isinstance(e.code, str) else err.getvalue().strip().splitlines()[-1]]
    finally:
        os.chdir(cwd)
    return []


# -----------------------------------------------------------------------------
# the tests

COMMANDS = doc_commands()


def test_the_docs_have_commands_to_check():
    scripts = {script for _, script, _ in COMMANDS}
    assert {"train_grpo.py", "train_sft.py", "distill.py", "sample.py"} <= scripts
    assert any(where.startswith("README.md") and args and args[0].startswith("config/")
               for where, _, args in COMMANDS), "README: no command runs a config/ recipe"


@pytest.mark.parametrize("where,script,args", COMMANDS, ids=[f"{w} {s}" for w, s, _ in COMMANDS])
def test_every_command_in_the_docs_is_valid(where, script, args):
    found = problems(script, args)
    assert not found, f"{where}: {' '.join(['python', script, *args])}: {found}"


def test_every_config_file_named_in_the_docs_exists():
    named = {(rel, name) for rel in DOCS + RECIPES for name in re.findall(r"\bconfig/[\w.-]+\.py\b", _read(rel))
             if not re.fullmatch(r"config/[A-Z_]+\.py", name)}  # config/NAME.py: a placeholder
    assert not [(rel, name) for rel, name in named if not os.path.isfile(os.path.join(ROOT, name))]


def _slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation but `-` and `_` dropped, spaces to `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_between_the_docs_resolves():
    """Relative links point at files that exist, and a #section at a heading there."""
    bad = []
    for rel in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", _read(rel)):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(rel), path)) if path else rel
            if not os.path.exists(os.path.join(ROOT, path)):
                bad.append((rel, target, "no such file"))
            elif anchor and anchor not in {_slug(h) for h in re.findall(r"^#+ (.+)$", _read(path), re.M)}:
                bad.append((rel, target, "no such section"))
    assert not bad


def test_the_readme_serves_a_new_user():
    """The user's first screen: the main job and the tests within 40 lines, a real checkpoint on GPUs within 80; short;
    no commit hashes or CPU models (run-by-run history lives in git log, the measurements in docs/results.md)."""
    text = _read("README.md")
    lines = text.splitlines()
    assert len(lines) <= 250
    first = [(int(w.split(":")[1]), s, a) for w, s, a in COMMANDS if w.startswith("README.md:")]
    assert any(n <= 40 and s == "train_grpo.py" and not a for n, s, a in first), "the main job, bare, in lines 1-40"
    assert any(n <= 40 and "pytest" in line for n, line in enumerate(lines, 1)), "the test command in lines 1-40"
    torchrun = [n for n, line in enumerate(lines, 1) if line.lstrip().startswith("torchrun") and "config/" in line]
    assert torchrun and torchrun[0] <= 80, "a torchrun command with a real-model recipe in lines 1-80"
    for rel in USER_DOCS:  # the README and what it links to
        doc = _read(rel)
        assert not re.findall(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", doc), f"{rel}: commit hash"
        assert not re.findall(r"\b(?:Xeon|EPYC|AMD|Intel)\b", doc), f"{rel}: a CPU model (write: 2-core x86 CPU)"


# the checker itself: a doc with a made-up flag, a wrong type or a missing recipe fails


def _check_snippet(markdown):
    return [p for _, script, args in commands(code_blocks(markdown)) for p in problems(script, args)]


def test_a_good_snippet_passes():
    assert _check_snippet("```bash\npython train_grpo.py config/r1zero_tiny.py --lr=1e-4 --seed=2 \\\n"
                          "    --out_dir=out/x\ntorchrun --standalone --nproc_per_node=8 train_sft.py --init_from=/m "
                          "--fsdp=1   # a comment --no_such_flag=1\n"
                          "OMP_NUM_THREADS=1 python sample.py --eval --temperature=0 && python plot.py a.jsonl\n"
                          "python data/prepare_tiny.py --seed=3\npython bench/sample.py --threads=1\n```") == []


@pytest.mark.parametrize("snippet,complaint", [
    ("python train_grpo.py --no_such_flag=1", "unknown option --no_such_flag"),
    ("python train_grpo.py --seed=2 \\\n    --no_such_flag=1", "unknown option --no_such_flag"),  # continued line
    ("torchrun --standalone --nproc_per_node=8 distill.py --no_such_flag=1", "unknown option --no_such_flag"),
    ("python sample.py --no_such_flag=1", "unknown option --no_such_flag"),
    ("python train_sft.py --max_steps=ten", "expected int"),
    ("python train_grpo.py --loss_agg=tokens", "expected one of"),
    ("python train_grpo.py config/no_such_recipe.py", "no such config file"),
    ("python no_such_script.py", "no such script"),
    ("python data/prepare_tiny.py --seed=x", "invalid int value"),
    ("python bench/sample.py --thread=1", "unrecognized arguments"),
    ("python plot.py --no_such_flag=1", "takes no options"),
])
def test_a_bad_command_fails(snippet, complaint):
    found = _check_snippet(f"```\n{snippet}\n```")
    assert len(found) == 1 and complaint in found[0], found
