"""Tests for tokenizer.py: golden parity with transformers (computed live), masks, errors.

transformers is only the reference here; tokenizer.py never imports it.
"""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tokenizer import CHATML, DEEPSEEK_R1, Tokenizer  # noqa: E402

transformers = pytest.importorskip("transformers")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"
QWEN_DIR, QWEN3_DIR, R1_DIR = FIXTURES / "qwen2.5", FIXTURES / "qwen3", FIXTURES / "deepseek-r1-distill-qwen"
R1_SHIPPED_GENERATION = "{{'<｜Assistant｜>'}}{% endif %}"
R1_THINK_GENERATION = "{{'<｜Assistant｜><think>\\n'}}{% endif %}"  # the later upstream revision
PLAIN_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def sys_(c):
    return {"role": "system", "content": c}


def user(c):
    return {"role": "user", "content": c}


def asst(c):
    return {"role": "assistant", "content": c}


CONVERSATIONS = {
    "single_user": [user("What is 2+2?")],
    "system_user": [sys_("You are a careful math tutor."), user("Solve x^2 = 4.")],
    "multi_turn": [user("Hi"), asst("Hello! How can I help?"), user("Count to 3."), asst("1, 2, 3.")],
    "system_multi_turn": [sys_("Be brief."), user("a"), asst("b"), user("c")],
    "unicode": [sys_("Réponds en français 🙂"), user("你好，世界！Ça va? naïve café e\u0301 👍🏽"), asst("很好 🎉 déjà vu")],
    "empty_contents": [sys_(""), user(""), asst(""), user("")],
    "think_multi_turn": [
        user("1+1?"), asst("<think>\nadd them\n</think>\n\nThe answer is 2."),
        user("2+2?"), asst("<think>easy</think>4"),
    ],
    "think_two_closings": [user("q"), asst("<think>a</think>mid</think>\n\nfinal")],
    "think_unclosed": [user("q"), asst("<think>still thinking")],
    "trailing_whitespace": [sys_("sys  \n"), user("question \n\n"), asst("answer\n\n  "), user("  lead and trail \t\n")],
    "leading_newline_assistant": [user("q"), asst("\n\nstarts with newlines"), user("\n again")],
    "system_in_middle": [user("first"), asst("ok"), sys_("new rules"), user("second")],
    "two_systems": [sys_("one"), sys_("two"), user("u")],
    "special_strings_in_content": [user("say <|im_end|> or <｜end▁of▁sentence｜>"), asst("<|endoftext|> done")],
    "assistant_first": [asst("I start."), user("ok")],
}
# ChatML content that starts with (spaces +) newline merges with the header's "\n" into one token.
STRADDLING = {"leading_newline_assistant"}


def hf_ids(hf, messages, add_generation_prompt):
    out = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def hf_text(hf, messages, add_generation_prompt):
    return hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def make_variant(tmp_dir: Path, base: Path, chat_template: str, generation_config=None) -> Path:
    """A tokenizer folder = base's tokenizer.json + base's config with another chat_template."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(base / "tokenizer.json", tmp_dir / "tokenizer.json")
    config = json.loads((base / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = chat_template
    (tmp_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    if generation_config is not None:
        (tmp_dir / "generation_config.json").write_text(json.dumps(generation_config), encoding="utf-8")
    return tmp_dir


@pytest.fixture(scope="module")
def variant_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    r1_template = json.loads((R1_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    assert R1_SHIPPED_GENERATION in r1_template
    return {
        "qwen2.5": QWEN_DIR,
        "qwen3": QWEN3_DIR,
        "r1": R1_DIR,
        "r1_think": make_variant(root / "r1_think", R1_DIR, r1_template.replace(R1_SHIPPED_GENERATION, R1_THINK_GENERATION)),
        "plain_chatml": make_variant(root / "plain_chatml", QWEN_DIR, PLAIN_CHATML),
    }


@pytest.fixture(scope="module", params=["qwen2.5", "qwen3", "r1", "r1_think", "plain_chatml"])
def pair(request, variant_dirs):
    """(ours, transformers) for one template variant; loaded once per module."""
    path = variant_dirs[request.param]
    return request.param, Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def qwen():
    return Tokenizer.from_pretrained(QWEN_DIR)


@pytest.fixture(scope="module")
def r1():
    return Tokenizer.from_pretrained(R1_DIR)


@pytest.fixture(scope="module")
def hf_qwen():
    return transformers.AutoTokenizer.from_pretrained(str(QWEN_DIR))


# ---------------------------------------------------------------- golden chat templates
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_template_matches_transformers(pair, name, add_generation_prompt):
    _, ours, hf = pair
    messages = CONVERSATIONS[name]
    assert ours.render_chat(messages, add_generation_prompt) == hf_text(hf, messages, add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == hf_ids(hf, messages, add_generation_prompt)


def test_variant_detection(pair):
    variant, ours, _ = pair
    expected = {
        "qwen2.5": (CHATML, "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "<|im_start|>assistant\n"),
        "qwen3": (CHATML, None, "<|im_start|>assistant\n"),
        "plain_chatml": (CHATML, None, "<|im_start|>assistant\n"),
        "r1": (DEEPSEEK_R1, None, "<｜Assistant｜>"),
        "r1_think": (DEEPSEEK_R1, None, "<｜Assistant｜><think>\n"),
    }[variant]
    assert (ours.chat_format, ours.default_system_prompt, ours.generation_prompt) == expected


def test_apply_chat_template_defaults_to_generation_prompt(pair):
    _, ours, hf = pair
    messages = CONVERSATIONS["single_user"]
    assert ours.apply_chat_template(messages) == hf_ids(hf, messages, True)


def test_default_system_prompt_read_from_template(tmp_path):
    template = json.loads((QWEN_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    custom = template.replace("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "Think step by step.")
    ours = Tokenizer.from_pretrained(make_variant(tmp_path, QWEN_DIR, custom))
    assert ours.default_system_prompt == "Think step by step."
    assert ours.render_chat([user("hi")]).startswith("<|im_start|>system\nThink step by step.<|im_end|>\n")


fragments = st.sampled_from(["a", "Hi", " ", "  ", "\n", "\n\n", "\t", "你好", "🎉", "é", "<think>", "</think>", "<|im_end|>", "1+1", "."])
contents = st.lists(fragments, max_size=8).map("".join)
conversations = st.tuples(st.one_of(st.none(), contents), st.lists(st.tuples(contents, contents), min_size=1, max_size=3), st.booleans())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversation=conversations)
def test_random_conversations_match_transformers(pair, conversation):
    _, ours, hf = pair
    system, turns, add_generation_prompt = conversation
    messages = ([sys_(system)] if system is not None else []) + [m for u, a in turns for m in (user(u), asst(a))]
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == hf_ids(hf, messages, add_generation_prompt)
    ids, mask = ours.encode_chat_with_mask(messages, keep_final_thinking=False)
    assert ids == hf_ids(hf, messages, False) and len(mask) == len(ids)


# ---------------------------------------------------------------- SFT masks
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_mask_ids_equal_chat_template(pair, name):
    _, ours, hf = pair
    messages = CONVERSATIONS[name]
    ids, mask = ours.encode_chat_with_mask(messages, keep_final_thinking=False)
    assert ids == ours.apply_chat_template(messages, add_generation_prompt=False) == hf_ids(hf, messages, False)
    assert len(mask) == len(ids) and set(mask) <= {0, 1}


def learned_runs(tok, ids, mask):
    """Decoded text of each maximal run of mask == 1."""
    runs, current = [], []
    for token_id, m in zip(ids + [None], mask + [0]):
        if m:
            current.append(token_id)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs


@pytest.mark.parametrize("name", [n for n in CONVERSATIONS if n not in STRADDLING])
def test_mask_covers_exactly_assistant_content_and_turn_end(pair, name):
    _, ours, hf = pair
    messages = CONVERSATIONS[name]
    ids, mask = ours.encode_chat_with_mask(messages, keep_final_thinking=False)
    if ours.chat_format == CHATML:  # what the template prints in each assistant turn (Qwen3 moves the reasoning)
        turns = re.findall(r"<\|im_start\|>assistant\n(.*?)<\|im_end\|>", hf_text(hf, messages, False), re.S)
        expected = [content + "<|im_end|>" for content in turns]
    else:  # the R1 template drops everything up to the last </think> of each assistant turn
        expected = [m["content"].split("</think>")[-1] + "<｜end▁of▁sentence｜>" for m in messages if m["role"] == "assistant"]
    assert learned_runs(ours, ids, mask) == expected
    # Nothing outside the runs is learned: the masked-out tokens are exactly the rest of the text.
    masked_out = ours.decode([i for i, m in zip(ids, mask) if not m])
    assert len(masked_out) + sum(map(len, expected)) == len(ours.decode(ids))


def test_mask_header_is_not_learned(qwen, r1):
    messages = [user("q"), asst("a")]
    ids, mask = qwen.encode_chat_with_mask(messages)
    assert qwen.decode([i for i, m in zip(ids, mask) if m]) == "a<|im_end|>"
    assert mask[-1] == 0 and qwen.decode(ids[-1:]) == "\n"  # the newline after <|im_end|>
    ids, mask = r1.encode_chat_with_mask(messages)
    assert mask == [0, 0, 0, 0, 1, 1]  # bos, <｜User｜>, q, <｜Assistant｜>, a, eos


def test_mask_token_straddling_header_and_content_is_learned(qwen):
    ids, mask = qwen.encode_chat_with_mask([user("q"), asst("\n\nx")])
    learned = [qwen.decode([i]) for i, m in zip(ids, mask) if m]
    assert learned == ["\n\n\n", "x", "<|im_end|>"]  # header "\n" merged with the content's "\n\n"


# ---------------------------------------------------------------- encode / decode
TEXTS = ["Hello, world!", "你好，世界", "emoji 🎉👍🏽 family 👨‍👩‍👧", "accents: café naïve Ångström", "  spaces\n\nnewlines\t",
         "", "a<|im_end|>b<|endoftext|>", "<think>\nreason\n</think>\n\n\\boxed{42}"]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_matches_transformers(qwen, hf_qwen, text):
    ids = qwen.encode(text)
    assert ids == hf_qwen.encode(text, add_special_tokens=False)
    assert qwen.decode(ids) == hf_qwen.decode(ids) == text
    assert qwen.decode(ids, skip_special_tokens=True) == hf_qwen.decode(ids, skip_special_tokens=True)


def test_encode_recognises_special_tokens_and_adds_none(qwen, r1):
    assert qwen.encode("<|im_start|>user") == [151644, 872]
    assert r1.encode("hi") == [6023]  # no bos prepended even though the R1 post-processor would
    assert r1.encode("<｜User｜><think>") == [151644, 151648]
    assert qwen.decode(qwen.encode("x<|im_end|>"), skip_special_tokens=True) == "x"


def test_special_ids_and_properties(qwen, r1):
    assert (qwen.eos_id, qwen.pad_id, qwen.bos_id) == (151645, 151643, None)
    assert qwen.stop_ids == {151645, 151643}
    assert (r1.eos_id, r1.pad_id, r1.bos_id) == (151643, 151654, 151646)
    assert r1.stop_ids == {151643}
    assert qwen.vocab_size == r1.vocab_size == 151665
    assert qwen.token_to_id("<|im_end|>") == 151645 and qwen.token_to_id("<｜User｜>") is None


def test_generation_config_eos_adds_to_stop_ids_and_pad_falls_back_to_eos(tmp_path):
    template = json.loads((QWEN_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    folder = make_variant(tmp_path / "a", R1_DIR, template, generation_config={"eos_token_id": [151643, 151647]})
    assert Tokenizer.from_pretrained(folder).stop_ids == {151643, 151647}
    folder = make_variant(tmp_path / "b", R1_DIR, template, generation_config={"eos_token_id": 151650})
    assert 151650 in Tokenizer.from_pretrained(folder).stop_ids
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["pad_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = Tokenizer.from_pretrained(folder)
    assert tok.pad_id == tok.eos_id == 151643


# ---------------------------------------------------------------- errors
def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        Tokenizer.from_pretrained(tmp_path / "nope")


def test_malformed_config_names_the_file(tmp_path):
    folder = make_variant(tmp_path, QWEN_DIR, PLAIN_CHATML)
    (folder / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(folder)
    make_variant(folder, QWEN_DIR, PLAIN_CHATML, generation_config={})
    (folder / "generation_config.json").write_text("[oops", encoding="utf-8")
    with pytest.raises(ValueError, match="generation_config.json"):
        Tokenizer.from_pretrained(folder)


def test_unknown_template_is_rejected_with_path_and_families(tmp_path):
    folder = make_variant(tmp_path, QWEN_DIR, "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    with pytest.raises(ValueError, match="ChatML.*DeepSeek-R1") as info:
        Tokenizer.from_pretrained(folder)
    assert str(folder / "tokenizer_config.json") in str(info.value)


def test_missing_template_allows_plain_encoding_only(tmp_path):
    folder = make_variant(tmp_path, QWEN_DIR, "")
    tok = Tokenizer.from_pretrained(folder)
    assert tok.encode("hi") == [6023]
    with pytest.raises(ValueError, match="no chat_template"):
        tok.apply_chat_template([user("hi")])


@pytest.mark.parametrize("messages, match", [
    ([user("a"), {"content": "no role"}], "message 1: expected a dict with 'role' and 'content'"),
    ([{"role": "user"}], "message 0: expected a dict with 'role' and 'content'"),
    ([user("a"), {"role": "robot", "content": "x"}], "message 1: unknown role 'robot'; expected one of system, user, assistant, tool"),
    (["just a string"], "message 0: expected a dict"),
    ([user(None)], "message 0: expected 'content' to be a str"),
    ([], "non-empty list"),
])
def test_invalid_messages(qwen, r1, messages, match):
    for tok in (qwen, r1):
        with pytest.raises(ValueError, match=match):
            tok.apply_chat_template(messages)
        with pytest.raises(ValueError, match=match):
            tok.encode_chat_with_mask(messages)


def test_template_from_chat_template_jinja_or_named_list(tmp_path):
    folder = make_variant(tmp_path / "jinja", QWEN_DIR, "")  # transformers >= 4.43 saves the template here
    (folder / "chat_template.jinja").write_text(PLAIN_CHATML, encoding="utf-8")
    assert Tokenizer.from_pretrained(folder).render_chat([user("hi")]) == "<|im_start|>user\nhi<|im_end|>\n"
    folder = make_variant(tmp_path / "named", QWEN_DIR, [{"name": "default", "template": PLAIN_CHATML}])
    assert Tokenizer.from_pretrained(folder).generation_prompt == "<|im_start|>assistant\n"


def test_mask_keeps_final_turn_thinking_for_training(r1, qwen):
    """SFT on reasoning traces: the R1 template would drop the final turn's <think> block; training keeps it
    (earlier turns are still rendered as the template does)."""
    messages = [user("q1"), asst("<think>\nold</think>\n\na1"), user("q2"), asst("<think>\nsteps\n</think>\n\n42")]
    ids, mask = r1.encode_chat_with_mask(messages)
    assert learned_runs(r1, ids, mask) == ["\n\na1<｜end▁of▁sentence｜>", "<think>\nsteps\n</think>\n\n42<｜end▁of▁sentence｜>"]
    prompt = r1.apply_chat_template(messages[:3], add_generation_prompt=True)
    assert ids[:len(prompt)] == prompt  # the trained sequence extends exactly what generation is prompted with
    ids_q, mask_q = qwen.encode_chat_with_mask(messages)  # ChatML never drops anything
    assert (ids_q, mask_q) == qwen.encode_chat_with_mask(messages, keep_final_thinking=False)
