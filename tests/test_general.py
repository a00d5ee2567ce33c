"""The general (non-reasoning) side of the embedded world (data/tiny_chat.py, the shipped files) and the converter
for public chat sets (data/prepare_general.py)."""
import json
import os
import random
import re

import pytest

import dataloader
from data import prepare_general, tiny_chat
from tests.helpers import make_tiny_tokenizer, write_jsonl
from tokenizer import Tokenizer

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data/tiny")


def _rows(name):
    return [json.loads(line) for line in open(os.path.join(TINY, name))]


def _addressee(prompt):
    return re.match(r"(?:Greet|Say goodbye to|Thank|Ask) (\w+)", prompt).group(1)


def test_shipped_general_files_hold_out_their_names():
    test_names = set(tiny_chat.TEST_NAMES)
    assert not test_names & set(tiny_chat.NAMES)
    for name in ("general.jsonl", "general_prompts.jsonl", "prefs.jsonl"):
        for r in _rows(name):
            prompt = r["messages"][0]["content"] if "messages" in r else r["prompt"]
            assert _addressee(prompt) in tiny_chat.NAMES, (name, prompt)
    for name in ("general_test.jsonl", "prefs_test.jsonl"):
        assert all(_addressee(r["prompt"]) in test_names for r in _rows(name))
    # the RL prompts carry nothing a rule reward could check, so stage 4 hands them to the reward model
    assert all("answer" not in r for r in _rows("general_prompts.jsonl") + _rows("general_test.jsonl"))


def test_preference_pairs_prefer_the_polite_answer_to_the_right_person():
    rows = _rows("prefs.jsonl")
    kinds = {r["kind"] for r in rows}
    assert kinds == set(tiny_chat.REJECTED_KINDS)
    for r in rows:
        assert tiny_chat.politeness(r["prompt"], r["chosen"]) == 1.0
        assert tiny_chat.politeness(r["prompt"], r["rejected"]) == 0.0, r
    general = _rows("general.jsonl")
    polite = sum(tiny_chat.politeness(r["messages"][0]["content"], r["messages"][1]["content"])
                 for r in general) / len(general)
    assert 0.25 < polite < 0.35  # --polite_frac=0.3: RL has a minority behaviour to find


def test_rows_are_deterministic_given_the_seed():
    a = [tiny_chat.preference_row(random.Random(7), tiny_chat.NAMES) for _ in range(5)]
    b = [tiny_chat.preference_row(random.Random(7), tiny_chat.NAMES) for _ in range(5)]
    assert a == b


# ---- prepare_general.py


def test_convert_normalises_filters_and_samples(tmp_path):
    src = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "Write a haiku."}, {"role": "assistant", "content": "Leaves fall."}]},
        {"conversations": [{"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello there."}]},
        {"messages": [{"role": "user", "content": "write  a HAIKU."}, {"role": "assistant", "content": "Again."}]},
        {"messages": [{"role": "user", "content": "Unanswered?"}]},
        {"messages": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "<think>x</think> y"}]},
        {"messages": [{"role": "user", "content": "Empty"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A long one"},
                      {"role": "assistant", "content": "word " * 400}]},
    ])
    tok_dir = make_tiny_tokenizer(tmp_path / "tok")
    rows, dropped = prepare_general.convert([src], tok=Tokenizer.from_pretrained(tok_dir), max_tokens=200)
    assert [r["messages"][-1]["content"] for r in rows] == ["Leaves fall.", "Hello there."]
    assert rows[1]["messages"][0] == {"role": "user", "content": "Hi!"} and rows[1]["source"] == f"{src}:2"
    assert dropped == {"duplicate": 1, "no_final_answer": 1, "reasoning": 1, "empty_turn": 1, "too_long": 1}
    some, _ = prepare_general.convert([src], n=1, seed=3)
    assert len(some) == 1 and some == prepare_general.convert([src], n=1, seed=3)[0]


def test_bad_rows_name_the_file_and_line(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", [
        {"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}]},
        {"text": "no conversation"},
    ])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a non-empty 'messages'"):
        prepare_general.convert([src])
    rows, dropped = prepare_general.convert([src], skip_bad_rows=True)
    assert len(rows) == 1 and dropped["bad_row"] == 1
    src2 = write_jsonl(tmp_path / "role.jsonl", [{"messages": [{"role": "narrator", "content": "x"}]}])
    with pytest.raises(ValueError, match=r"role.jsonl:1: turn 0 needs a role"):
        prepare_general.convert([src2])


def test_cli_writes_rows_that_train_sft_reads(tmp_path, capsys):
    src = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": f"Question {i}"}, {"role": "assistant", "content": f"Answer {i}"}]}
        for i in range(10)])
    out = tmp_path / "general.jsonl"
    prepare_general.main([f"--src={src}", f"--out={out}", "--n=4"])
    assert "wrote 4 rows" in capsys.readouterr().out
    tok = Tokenizer.from_pretrained(make_tiny_tokenizer(tmp_path / "tok"))
    sources, stats = dataloader.load_examples([str(out)], tok, mode="sft", max_seq_len=64)
    assert len(sources[0]) == 4 and stats["skipped"] == 0
