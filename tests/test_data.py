"""data/: the tiny task and its files, the tokenizer, the converters, and bad-data errors."""

import ast
import filecmp
import json
import operator
import random
import re
import urllib.request
from pathlib import Path

import pytest

from data import prepare_coldstart, prepare_gsm8k, prepare_math500, prepare_tiny, tiny_task
from data.jsonl import convert_jsonl, read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "data" / "tiny"
FIXTURES = ROOT / "tests" / "fixtures" / "data"
TINY_FILES = ["test.jsonl", "train.jsonl", "coldstart.jsonl", "pretrain.jsonl",
              "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
STEP = re.compile(r"^(-?\d+)([-+*])(\(-\d+\)|\d+)=(-?\d+)(?:, so (.+))?$")


def ast_eval(expr):
    """Independent check of the task's solver: Python's own parser, integer + - * and unary minus only."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}

    def walk(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"unexpected syntax {ast.dump(node)}")

    return walk(ast.parse(expr, mode="eval").body)


def expr_of(text):
    """The problem inside any rendering: a question, a 'Problem:' line or a bare 'expr=N' fact."""
    m = re.search(r"What is (.+?)\?", text) or re.match(r"Problem: (.+)\n", text) or re.fullmatch(r"(.+)=-?\d+", text)
    assert m, text
    return m.group(1)


def check_steps(expr, lines, expected):
    """Each line does one correct operation, and the rewritten rest still has the answer's value."""
    assert lines
    for i, line in enumerate(lines):
        m = STEP.match(line)
        assert m, line
        a, op, b, c, rest = m.groups()
        assert ast_eval(f"{a}{op}{b}") == int(c), line
        if i < len(lines) - 1:
            assert rest is not None and ast_eval(rest) == expected, line
        else:
            assert rest is None and int(c) == expected, line


@pytest.fixture(scope="module")
def tiny():
    return {name: read_jsonl(TINY / f"{name}.jsonl") for name in ("test", "train", "coldstart", "pretrain")}


# ---- the task ---------------------------------------------------------------------------------

def test_solver_and_evaluator_agree_with_python_ints():
    rng = random.Random(0)
    for _ in range(2000):
        expr = tiny_task.generate(rng, 1, 6, max_num=30, max_value=10**6, paren_prob=0.5)
        value = tiny_task.evaluate(expr)
        assert value == tiny_task.answer(expr) == ast_eval(expr), expr
        check_steps(expr, tiny_task.solution_lines(expr), value)
    assert tiny_task.solution_lines("7+8*3-(5-2)") == ["5-2=3, so 7+8*3-3", "8*3=24, so 7+24-3", "7+24=31, so 31-3", "31-3=28"]
    assert tiny_task.solution_lines("4*(3-7)") == ["3-7=-4, so 4*(-4)", "4*(-4)=-16"]
    for bad in ("2+", "(2+3", "2+3)", "2/3", "import os"):
        with pytest.raises(ValueError):
            tiny_task.evaluate(bad)


def test_difficulty_flags(tmp_path):
    prepare_tiny.main([f"--out_dir={tmp_path}", "--min_ops=5", "--max_ops=5", "--max_num=9", "--n_test=20",
                       "--n_train=20", "--n_coldstart=20", "--n_pretrain=20"])
    for row in read_jsonl(tmp_path / "test.jsonl"):
        assert len(tiny_task.solve(expr_of(row["prompt"]))) == 5
        assert all(int(n) <= 9 for n in re.findall(r"\d+", row["prompt"]))


def test_generator_is_deterministic(tmp_path):
    small = ["--n_test=50", "--n_train=100", "--n_coldstart=50", "--n_pretrain=200"]
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        prepare_tiny.main([f"--out_dir={tmp_path / name}", f"--seed={seed}", *small])
    for f in TINY_FILES:
        assert filecmp.cmp(tmp_path / "a" / f, tmp_path / "b" / f, shallow=False), f
    assert not filecmp.cmp(tmp_path / "a" / "train.jsonl", tmp_path / "c" / "train.jsonl", shallow=False)


def test_committed_files_are_the_default_output(tmp_path):
    prepare_tiny.main([f"--out_dir={tmp_path}"])
    for f in TINY_FILES:
        assert filecmp.cmp(tmp_path / f, TINY / f, shallow=False), f"data/tiny/{f} is stale: rerun data/prepare_tiny.py"


# ---- the committed files ----------------------------------------------------------------------

def test_splits_are_disjoint_and_sized(tiny):
    problems = {name: [expr_of(r["prompt"] if "prompt" in r else r["text"] if "text" in r else r["messages"][0]["content"])
                       for r in rows] for name, rows in tiny.items()}
    sets = {name: set(p) for name, p in problems.items()}
    for name, p in problems.items():
        assert len(p) == len(sets[name]), f"duplicate problem inside {name}"
    assert sets["test"].isdisjoint(sets["train"] | sets["coldstart"] | sets["pretrain"])
    assert sets["train"].isdisjoint(sets["coldstart"] | sets["pretrain"]) and sets["coldstart"].isdisjoint(sets["pretrain"])
    assert (len(sets["test"]), len(sets["train"]), len(sets["coldstart"]), len(sets["pretrain"])) == (500, 10000, 3000, 40000)
    assert sum((TINY / f).stat().st_size for f in TINY_FILES) < 8e6


def test_prompt_rows_answers(tiny):
    for row in tiny["test"] + tiny["train"]:
        assert set(row) == {"prompt", "messages", "answer"}
        assert row["messages"] == [{"role": "user", "content": row["prompt"]}]
        expr = expr_of(row["prompt"])
        assert row["answer"] == str(ast_eval(expr)) == str(tiny_task.evaluate(expr))


def test_coldstart_rows_are_r1_format_with_correct_steps(tiny):
    pattern = re.compile(r"<think>\n(.+)\n</think>\n\\boxed\{(-?\d+)\}", re.S)
    for row in tiny["coldstart"]:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        m = pattern.fullmatch(assistant["content"])
        assert m, assistant["content"]
        expr = expr_of(user["content"])
        assert int(m.group(2)) == ast_eval(expr)
        check_steps(expr, m.group(1).split("\n"), ast_eval(expr))


def test_pretrain_teaches_steps_not_the_chat_format(tiny):
    for row in tiny["pretrain"]:
        text = row["text"]
        assert not any(t in text for t in SPECIALS + ["\\boxed", "<answer>"]), text
        expr = expr_of(text)
        value = ast_eval(expr)
        if "\n" in text:  # a worked solution: the step lines sit between the question and the last line
            lines = text.split("\n")
            steps = [l.split(": ", 1)[-1] for l in lines[1:-1] if l != "Solution:"]
            check_steps(expr, steps, value)
            assert lines[-1] in (f"The answer is {value}.", f"So {expr}={value}.")
        else:
            assert text == f"{expr}={value}"


# ---- the tokenizer ----------------------------------------------------------------------------

def chatml(messages, add_generation_prompt):
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def test_tokenizer_round_trips_everything_and_has_single_id_specials(tiny):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TINY / "tokenizer" / "tokenizer.json"))
    assert tok.get_vocab_size() <= 512
    ids = [tok.token_to_id(t) for t in SPECIALS]
    assert None not in ids and len(set(ids)) == 5
    for t, i in zip(SPECIALS, ids):
        assert tok.encode(f"x{t}y", add_special_tokens=False).ids[1] == i
    texts = [r["text"] for r in tiny["pretrain"]] + [chatml(r["messages"], False) for r in tiny["coldstart"]]
    texts += [r["prompt"] for r in tiny["test"]] + [" two  spaces\n\n\ttab ünïcödé 中文 🙂", "\n", " "]
    for text, enc in zip(texts, tok.encode_batch(texts, add_special_tokens=False)):
        assert tok.decode(enc.ids, skip_special_tokens=False) == text
    assert all(len(tok.encode(d).ids) == 1 for d in "0123456789")
    assert len(tok.encode("12345").ids) == 5  # digits are never merged, as in Qwen


def test_transformers_loads_tokenizer_and_chat_template_matches_chatml(tiny):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    config = json.loads((TINY / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>" and config["bos_token"] is None
    assert {v["content"] for v in config["added_tokens_decoder"].values()} == set(SPECIALS)
    assert config["chat_template"] == prepare_tiny.CHAT_TEMPLATE
    hf = transformers.AutoTokenizer.from_pretrained(str(TINY / "tokenizer"))
    raw = Tokenizer.from_file(str(TINY / "tokenizer" / "tokenizer.json"))
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>" and hf.bos_token is None
    conversations = [r["messages"] for r in tiny["coldstart"][:20]] + [r["messages"] for r in tiny["test"][:20]]
    conversations.append([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1+2?"}])
    for messages in conversations:
        for gen in (False, True):
            text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert text == chatml(messages, gen)  # no default system prompt
            assert hf(text, add_special_tokens=False)["input_ids"] == raw.encode(text, add_special_tokens=False).ids
    # and the project's own tokenizer.py reads it the same way
    from tokenizer import Tokenizer as NanoTokenizer

    nano = NanoTokenizer.from_pretrained(TINY / "tokenizer")
    assert nano.default_system_prompt is None and nano.eos_id == raw.token_to_id("<|im_end|>")
    for messages in conversations:
        assert nano.render_chat(messages, add_generation_prompt=True) == chatml(messages, True)


# ---- converters -------------------------------------------------------------------------------

def test_gsm8k_converter(tmp_path):
    rows = read_jsonl(FIXTURES / "gsm8k_sample.jsonl")
    out = [prepare_gsm8k.convert_gsm8k_row(r) for r in rows]
    assert [r["answer"] for r in out] == ["18", "750", "7500", "-5"]
    first = out[0]
    assert first["prompt"] == rows[0]["question"]
    assert first["messages"] == [{"role": "user", "content": rows[0]["question"] + prepare_gsm8k.INSTRUCTION}]
    assert "<<" not in first["solution"] and "####" not in first["solution"] and "48-30=18" in first["solution"]
    assert prepare_gsm8k.convert_gsm8k_row(rows[0], instruction="")["messages"][0]["content"] == rows[0]["question"]
    sft = prepare_gsm8k.to_sft(first)["messages"][-1]["content"]
    assert sft.startswith("<think>\n") and sft.endswith("\n</think>\n\\boxed{18}")
    prepare_gsm8k.main([f"--out={tmp_path}", "--split=test", f"--src={FIXTURES / 'gsm8k_sample.jsonl'}", "--sft=1"])
    assert read_jsonl(tmp_path / "test.jsonl") == out and len(read_jsonl(tmp_path / "test_sft.jsonl")) == 4
    with pytest.raises(ValueError, match="####"):
        prepare_gsm8k.convert_gsm8k_row({"question": "q", "answer": "no final line"})


def test_math500_converter(tmp_path):
    rows = read_jsonl(FIXTURES / "math500_sample.jsonl")
    out = [prepare_math500.convert_math500_row(r) for r in rows]
    assert [r["answer"] for r in out] == ["\\frac{5}{6}", "6", "\\left( 2, \\frac{\\pi}{2} \\right)"]
    assert out[1]["prompt"] == "Solve for $x$: $3x-7=11$." and out[1]["level"] == 1 and out[1]["subject"] == "Algebra"
    assert out[1]["messages"][0]["content"].endswith("within \\boxed{}.")
    prepare_math500.main([f"--out={tmp_path}", f"--src={FIXTURES / 'math500_sample.jsonl'}", "--sft=1"])
    assert read_jsonl(tmp_path / "test.jsonl") == out
    assert read_jsonl(tmp_path / "test_sft.jsonl")[0]["messages"][-1]["content"].endswith("\\boxed{\\frac{5}{6}}")


def test_coldstart_converter(tmp_path, capsys):
    out = tmp_path / "cs.jsonl"
    prepare_coldstart.main([f"--src={FIXTURES / 'coldstart_sample.jsonl'}", f"--out={out}"])
    rows = read_jsonl(out)
    assert "dropped {'empty_cot': 1, 'mixed_language': 1}" in capsys.readouterr().out
    assert [r["messages"][0]["content"] for r in rows] == ["What is 2+3?", "What is 4*6?", "What is 10-7?", "What is 9+9?", "What is 8/2?"]
    assert rows[0]["messages"][1]["content"] == (
        "<think>\nI need 2+3. That is 5. Let me double-check: 5-3=2, yes.\n</think>\n\n2+3 = \\boxed{5}")
    assert rows[1]["messages"][1]["content"] == "<think>\n4*6 is 24.\n</think>\n\nThe answer is \\boxed{24}."
    assert rows[2]["messages"][1]["content"] == "<think>\n10 minus 7 leaves 3.\n</think>\n\n\\boxed{3}"
    assert rows[4]["messages"][1]["content"] == "<think>\n8 split in 2 is 4.\n</think>\n\n\\boxed{4}"
    for r in rows:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
    assert prepare_coldstart.rejection_reason("q", "x" * 50, "s", max_chars=10) == "too_long"
    assert prepare_coldstart.rejection_reason("q", "```py\n```", "s", drop_code=True) == "code_in_cot"
    assert prepare_coldstart.rejection_reason("一加一", "一加一等于二", "二") is None


# ---- bad data ---------------------------------------------------------------------------------

def test_bad_lines_name_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n\n{not json\n[1, 2]\n{"question": "q"}\n')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bad))}:3: invalid JSON"):
        read_jsonl(bad)
    assert len(read_jsonl(bad, skip_bad_rows=True)) == 2
    assert "skipped 2 bad row(s)" in capsys.readouterr().err
    bad.write_text('{"question": "q", "answer": "#### 1"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object, got list"):
        read_jsonl(bad)
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field 'answer'"):
        convert_jsonl(bad, prepare_gsm8k.convert_gsm8k_row)
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field\(s\) 'answer'"):
        read_jsonl(bad, required=("question", "answer"))
    assert len(convert_jsonl(bad, prepare_gsm8k.convert_gsm8k_row, skip_bad_rows=True)) == 1
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no rows"):
        read_jsonl(tmp_path / "empty.jsonl")


def test_coldstart_bad_row_names_line(tmp_path):
    bad = tmp_path / "cs.jsonl"
    write_jsonl(bad, [{"problem": "q", "reasoning": "r", "response": "s"}, {"problem": "q", "response": "no think"}])
    with pytest.raises(ValueError, match=r"cs.jsonl:2: assistant text has neither"):
        prepare_coldstart.main([f"--src={bad}", f"--out={tmp_path / 'o.jsonl'}"])
    prepare_coldstart.main([f"--src={bad}", f"--out={tmp_path / 'o.jsonl'}", "--skip_bad_rows=1"])
    assert len(read_jsonl(tmp_path / "o.jsonl")) == 1


def test_download_failure_is_a_clear_message(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit) as e:
        prepare_gsm8k.main([f"--out={tmp_path}", "--split=test"])
    assert "could not download https://raw.githubusercontent.com/openai/grade-school-math" in str(e.value)
    assert "--split=test --src=FILE" in str(e.value)
    with pytest.raises(SystemExit) as e:
        prepare_math500.main([f"--out={tmp_path}"])
    assert "HuggingFaceH4/MATH-500" in str(e.value) and "--src=FILE" in str(e.value)
    assert not list(tmp_path.rglob("*.part"))
