"""Chat templates with tools and Qwen3's thinking, token for token against transformers' jinja rendering, for the
real Qwen2.5 and Qwen3 tokenizers and the tiny world's (ChatML with Qwen's tool turns, no default system prompt)."""
import re
from pathlib import Path

import pytest

from tokenizer import Tokenizer
from tools import schemas

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "tokenizers"
DIRS = {"qwen2.5": FIXTURES / "qwen2.5", "qwen3": FIXTURES / "qwen3", "tiny": ROOT / "data" / "tiny" / "tokenizer"}
TOOLS = schemas(["calculator", "python"]) + [{"type": "function", "function": {
    "name": "lookup", "description": "Look a word up (ünïcode, \"quotes\").",
    "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}}]


def user(c):
    return {"role": "user", "content": c}


def asst(c, *calls, **extra):
    return {"role": "assistant", "content": c, **({"tool_calls": list(calls)} if calls else {}), **extra}


def tool(c):
    return {"role": "tool", "content": c}


def call(name, arguments, flat=False):
    return {"name": name, "arguments": arguments} if flat else \
        {"type": "function", "function": {"name": name, "arguments": arguments}}


CALC = call("calculator", {"expression": "17*23"})
PY = call("python", {"code": "print(2 ** 10)\nprint('ünï')"})
CONVERSATIONS = {
    "query": [user("What is 17*23?")],
    "system_query": [{"role": "system", "content": "Be exact."}, user("What is 17*23?")],
    "one_call": [user("What is 17*23?"), asst("", CALC), tool("391"), asst("The answer is 391.")],
    "text_before_call": [user("q"), asst("Let me compute.", CALC), tool("391"), asst("391")],
    "two_calls_two_results": [user("q"), asst("", CALC, PY), tool("391"), tool("1024\nünï"), asst("done")],
    "content_none": [user("q"), asst(None, CALC), tool("391")],
    "flat_call_and_string_arguments": [user("q"), asst("", call("calculator", '{"expression": "1+2"}', flat=True)),
                                       tool("3")],
    "multi_step": [user("q"), asst("", CALC), tool("391"), asst("Now the square.", PY), tool("1024"), asst("ok")],
    "reasoning_in_history": [user("q1"), asst("<think>\nold\n</think>\n\na1"), user("q2"),
                             asst("<think>\nplan\n</think>\n\n", CALC), tool("391"),
                             asst("<think>\nread it\n</think>\n\n391")],
    "reasoning_content_field": [user("q"), asst("", CALC, reasoning_content="\nwhy\n"), tool("391"), asst("x")],
    "tool_output_as_user_turn": [user("q"), asst("", CALC), user("<tool_response>\n391\n</tool_response>")],
    "error_result": [user("q"), asst("", call("nope", {})), tool("Error: unknown tool 'nope'.")],
}


@pytest.fixture(scope="module", params=list(DIRS))
def pair(request):
    path = DIRS[request.param]
    return request.param, Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(str(path))


def hf_render(hf, messages, tools, add_generation_prompt, enable_thinking, tokenize):
    out = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                 enable_thinking=enable_thinking, tokenize=tokenize)
    return list(out["input_ids"] if hasattr(out, "keys") else out) if tokenize else out


@pytest.mark.parametrize("enable_thinking", [True, False])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("with_tools", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_tool_conversations_match_transformers(pair, name, with_tools, add_generation_prompt, enable_thinking):
    family, ours, hf = pair
    messages, tools = CONVERSATIONS[name], TOOLS if with_tools else None
    kw = dict(tools=tools, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
    # Qwen3's jinja cannot read a None content ('</think>' in None); ours reads it as "", as Qwen2.5's does
    reference = [dict(m, content=m["content"] or "") for m in messages] if family == "qwen3" else messages
    assert ours.render_chat(messages, **kw) == hf_render(hf, reference, tokenize=False, **kw)
    assert ours.apply_chat_template(messages, **kw) == hf_render(hf, reference, tokenize=True, **kw)


def test_qwen3_thinking_defaults_on_and_reads_the_empty_think_block():
    qwen3 = Tokenizer.from_pretrained(DIRS["qwen3"])
    assert qwen3.generation_prompt == "<|im_start|>assistant\n" and qwen3.thinking
    assert qwen3.no_thinking_prompt == "<think>\n\n</think>\n\n"
    ids = qwen3.apply_chat_template([user("hi")])
    assert qwen3.decode(ids).endswith("<|im_start|>assistant\n")
    off = qwen3.apply_chat_template([user("hi")], enable_thinking=False)
    assert qwen3.decode(off).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_tiny_template_without_tools_is_plain_chatml():
    """The tiny tokenizer gained the tool branches; every conversation without tools renders as before."""
    ours = Tokenizer.from_pretrained(DIRS["tiny"])
    messages = [{"role": "system", "content": "s"}, user("q"), asst("<think>\n1+2=3\n</think>\n\\boxed{3}"), user("x")]
    plain = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    assert ours.render_chat(messages) == plain
    assert ours.render_chat(messages, add_generation_prompt=True) == plain + "<|im_start|>assistant\n"


def test_tool_turn_is_what_the_template_renders_after_the_calls(pair):
    """The Engine forces tool_turn(results) after a turn's <|im_end|>: it must be the template's own text."""
    _, ours, _ = pair
    for thinking in (True, False):
        # with reasoning: Qwen3 renders an assistant turn without any only while it is the last message
        calls = [user("q"), asst("<think>\nplan\n</think>\n\n", CALC, PY)]
        whole = ours.render_chat(calls + [tool("391"), tool("1024")], add_generation_prompt=True, tools=TOOLS,
                                 enable_thinking=thinking)
        head = ours.render_chat(calls, tools=TOOLS)
        assert head.endswith("<|im_end|>\n")
        assert whole == head[:-1] + ours.tool_turn(["391", "1024"], enable_thinking=thinking)


def test_sft_mask_learns_calls_and_not_tool_results(pair):
    name, ours, _ = pair
    messages = CONVERSATIONS["multi_step"]
    ids, mask = ours.encode_chat_with_mask(messages, tools=TOOLS)
    assert ids == ours.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=False)
    learned = [ours.decode([i for i, m in zip(ids, mask) if m])]
    text = ours.decode(ids)
    turns = re.findall(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", text, re.S)
    assert len(turns) == 3 and learned == ["".join(turns)]
    assert "<tool_response>" not in learned[0] and '"name": "python"' in learned[0]


def test_template_without_tools_refuses_them_clearly():
    r1 = Tokenizer.from_pretrained(FIXTURES / "deepseek-r1-distill-qwen")
    for kwargs, messages in (({"tools": TOOLS}, [user("q")]), ({}, CONVERSATIONS["one_call"])):
        with pytest.raises(ValueError, match="has no tool calls"):
            r1.apply_chat_template(messages, **kwargs)
    with pytest.raises(ValueError, match="has no tool calls"):
        r1.tool_turn(["1"])


@pytest.mark.parametrize("message, match", [
    (asst("", {"function": {"arguments": {}}}), "a tool call needs 'name'"),
    ({"role": "user", "content": "q", "tool_calls": [CALC]}, "on an assistant message"),
    (asst("", "not a call"), "a tool call needs 'name'"),
])
def test_malformed_tool_messages_are_refused(message, match):
    qwen = Tokenizer.from_pretrained(DIRS["qwen2.5"])
    with pytest.raises(ValueError, match=match):
        qwen.apply_chat_template([user("q"), message])
