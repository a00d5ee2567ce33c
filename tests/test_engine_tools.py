"""Engine.generate(..., tools=...): a completion with tool calls is token for token the chat template's rendering of
the conversation it stands for (Qwen2.5, Qwen3 thinking), the code-fence format, forced tokens masked out of the
loss and present in the KV cache, and rollouts that do not depend on the batch they were sampled in."""
import concurrent.futures
import os
import random
import time

import pytest
import torch

from engine import Engine
from helpers import ScriptedLM, make_tiny_checkpoint
from losses import completion_logprobs
from model import Transformer
from reward import format_reward
from tokenizer import Tokenizer
from tools import Call, ToolUse, schemas

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tokenizers")
TOOLS = schemas(["calculator", "python"])


def user(c):
    return {"role": "user", "content": c}


def asst(c, *calls):
    return {"role": "assistant", "content": c, **({"tool_calls": list(calls)} if calls else {})}


def tool(c):
    return {"role": "tool", "content": c}


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


CONVERSATIONS = {
    # one turn with two calls, answered in one tool turn
    "qwen2.5": [user("What are 17*23 and 2**10?"),
                asst("I will compute both.", call("calculator", expression="17*23"),
                     call("python", code="print(2 ** 10)")),
                tool("391"), tool("1024"), asst("17*23 = 391 and 2**10 = 1024.")],
    # thinking on (the default): two turns, each reasoning before its call
    "qwen3": [user("What is 17*23, squared?"),
              asst("<think>\nFirst the product.\n</think>\n\n", call("calculator", expression="17*23")), tool("391"),
              asst("<think>\nNow its square.\n</think>\n\n", call("python", code="print(391 ** 2)")), tool("152881"),
              asst("<think>\nDone.\n</think>\n\nIt is 152881.")],
}


def scripted(tok, prompt, target):
    """A model that writes `target` after `prompt`, token by token, whatever it is fed (greedy picks it)."""
    def next_logits(history):
        i = len(history) - len(prompt)
        logits = torch.full((tok.vocab_size,), -30.0)
        logits[target[i] if i < len(target) else tok.eos_id] = 30.0
        return logits
    return ScriptedLM(tok.vocab_size, next_logits)


@pytest.mark.parametrize("family", list(CONVERSATIONS))
def test_tool_rollout_is_the_template_rendering_token_for_token(family):
    tok = Tokenizer.from_pretrained(os.path.join(FIXTURES, family))
    conversation = CONVERSATIONS[family]
    ids = tok.apply_chat_template(conversation, tools=TOOLS, add_generation_prompt=False)
    _, sft_mask = tok.encode_chat_with_mask(conversation, tools=TOOLS)
    prompt = tok.apply_chat_template(conversation[:1], tools=TOOLS)
    assert ids[:len(prompt)] == prompt and tok.decode(ids[-1:]) == "\n"
    target = ids[len(prompt):-1]  # the completion ends with the final turn's <|im_end|>; its "\n" is the template's
    engine = Engine(scripted(tok, prompt, target), tok)
    out = engine.generate([prompt], max_new_tokens=len(target) + 8, temperature=0.0,
                          tools=ToolUse(tok, ["calculator", "python"]))[0][0]
    assert out.tokens == target and out.finish_reason == "stop"
    # what the model wrote (its turns) and what was forced (tool turns and headers) are the SFT mask's spans
    assert out.loss_mask == sft_mask[len(prompt):-1]
    assert 0 in out.loss_mask and out.loss_mask[-1] == 1
    forced = [i for i, m in enumerate(out.loss_mask) if not m]
    assert all(out.logprobs[i] == 0.0 and out.sample_logprobs[i] == 0.0 for i in forced)
    results = [m["content"] for m in conversation if m["role"] == "tool"]
    assert [(c["name"], c["result"], c["error"]) for c in out.tool_calls] == \
        [(c["function"]["name"], r, None) for c, r in zip([c for m in conversation for c in m.get("tool_calls", [])],
                                                           results)]
    # the format metric judges each assistant turn: Qwen3's three turns each think, then call or answer (Qwen2.5's
    # do not think: no <think> in any turn)
    assert format_reward(out.text, "strict") == (1.0 if family == "qwen3" else 0.0)
    if family == "qwen3":
        turns = out.text.split("<|im_end|>")
        assert len(turns) == 3 and format_reward(out.text, "soft") == 1.0
        unclosed = "<|im_end|>".join([turns[0], turns[1].replace("</think>", ""), turns[2]])
        assert format_reward(unclosed, "strict") == 0.0 and format_reward(unclosed, "soft") == 1.0  # (one pair)
    # one think block around the calls, closed in the last turn (the tiny world's traces): well formed too
    spanning = '<think>\n7+19=26<tool_call>\n{"name": "calculator"}\n</tool_call><|im_end|>26-18=8\n</think>\n8'
    assert format_reward(spanning, "strict") == 1.0


def test_code_format_answers_a_fenced_block_with_an_output_block():
    tok = Tokenizer.from_pretrained(os.path.join(FIXTURES, "qwen2.5"))
    prompt = tok.encode("Question: what is 6*7?\nAnswer:")
    wrote, then = " Let me compute.\n```python\nprint(6*7)\n```\n", "The answer is \\boxed{42}."
    forced = tok.encode("```output\n42\n```\n")
    target = tok.encode(wrote) + forced + tok.encode(then) + [tok.eos_id]
    engine = Engine(scripted(tok, prompt, target), tok)
    out = engine.generate([prompt], max_new_tokens=64, temperature=0.0,
                          tools=ToolUse(tok, ["python"], format="code"))[0][0]
    assert out.tokens == target and out.transcript == wrote + "```output\n42\n```\n" + then
    n = len(tok.encode(wrote))
    assert out.loss_mask == [1] * n + [0] * len(forced) + [1] * (len(target) - n - len(forced))
    assert out.tool_calls == [dict(name="python", arguments={"code": "print(6*7)\n"}, result="42", error=None)]
    assert out.text == wrote + then  # what rewards score: the tool's "42" is not the model's


def test_rewards_never_read_a_tools_output():
    """A row cut off right after a tool's answer: its transcript ends with the answer, its text does not have it."""
    tok = Tokenizer.from_pretrained(os.path.join(FIXTURES, "qwen2.5"))
    prompt = tok.encode("Q:")
    wrote = tok.encode("```python\nprint(6*7)\n```\n")
    out = Engine(scripted(tok, prompt, wrote + [0] * 20), tok).generate(
        [prompt], max_new_tokens=len(wrote) + 6, temperature=0.0, tools=ToolUse(tok, ["python"], format="code"))[0][0]
    assert out.finish_reason == "length" and "42" in out.transcript and "42" not in out.text


def test_a_call_left_open_at_the_token_limit_is_recorded():
    tok = Tokenizer.from_pretrained(os.path.join(FIXTURES, "qwen2.5"))
    prompt = tok.encode("Q:")
    target = tok.encode("```python\nprint(1 + ")
    out = Engine(scripted(tok, prompt, target + tok.encode("2)\n```")), tok).generate(
        [prompt], max_new_tokens=len(target), temperature=0.0, tools=ToolUse(tok, ["python"], format="code"))[0][0]
    assert out.finish_reason == "length" and out.loss_mask == [1] * len(target)
    assert out.tool_calls == [dict(name="python", arguments={"code": "print(1 + "}, result=None,
                                   error="unclosed call")]


class EchoTools:
    """A tool format for the Engine's mechanics alone: any token in `triggers` completes a call, answered with
    ' [n]' (n: the characters the row wrote since its last answer). sleep: None answers at once, in start itself;
    else each call runs on a worker thread and takes sleep() seconds first."""

    def __init__(self, triggers, sleep=None):
        self.triggers, self.sleep = set(triggers), sleep
        self.pool = concurrent.futures.ThreadPoolExecutor(4) if sleep else None

    def may_close(self, token):
        return token in self.triggers

    def calls(self, segment):
        return [Call("echo", {"n": str(len(segment))})]

    def answer(self, call):
        if self.sleep:
            time.sleep(self.sleep())
        call.result = f" [{call.arguments['n']}]"

    def start(self, calls, made_before):
        if self.pool is not None:
            return [self.pool.submit(self.answer, c) for c in calls]
        futures = [concurrent.futures.Future() for _ in calls]
        for c, f in zip(calls, futures):
            self.answer(c), f.set_result(None)
        return futures

    def respond(self, segment, calls):
        return calls[0].result

    def unclosed(self, segment):
        return None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "m", seed=3)
    return Transformer.from_pretrained(path), Tokenizer.from_pretrained(path)


def test_a_call_completed_on_the_last_token_of_the_budget_is_cut_not_stopped():
    """The chat format's call ends the turn with <|im_end|>, a stop token; on the budget's last token there is no room
    for the answer, so the row was cut by the budget: finish_reason "length", for --overlong=mask to see."""
    tok = Tokenizer.from_pretrained(os.path.join(FIXTURES, "qwen2.5"))
    prompt = tok.encode("Q:")
    target = tok.encode('<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>') + \
        [tok.token_to_id("<|im_end|>")]
    out = Engine(scripted(tok, prompt, target), tok).generate(
        [prompt], max_new_tokens=len(target), temperature=0.0, tools=ToolUse(tok, ["calculator"]))[0][0]
    assert out.tokens == target and out.finish_reason == "length" and out.loss_mask == [1] * len(target)
    assert [(c["name"], c["result"], c["error"]) for c in out.tool_calls] == \
        [("calculator", None, "no tokens left for the result")]


def test_forced_tokens_enter_the_cache_and_rollouts_do_not_depend_on_the_batch(tiny):
    model, tok = tiny
    prompts = [tok.encode(t) for t in ("What is 3 + 4?", "What is 12 + 1? <think>", "7")]
    G, T = 4, 40
    seeds = [100 + r for r in range(len(prompts) * G)]
    tools = EchoTools(range(60, 140))
    engine = Engine(model, tok)
    whole = engine.generate(prompts, num_samples=G, max_new_tokens=T, seed=seeds, tools=tools)
    flat = [c for group in whole for c in group]
    calls = [len(c.tool_calls) for c in flat]
    assert sum(calls) >= 4 and any(c.loss_mask[-1] == 1 and 0 in c.loss_mask for c in flat)  # sampled after forced
    for c in flat:
        assert len(c.tokens) == len(c.loss_mask) == len(c.logprobs) <= T
        assert all(lp == 0.0 for lp, m in zip(c.logprobs, c.loss_mask) if not m)
    # one row at a time, and in reverse order: the same completions
    for i, prompt in reversed(list(enumerate(prompts))):
        for j in reversed(range(G)):
            alone = engine.generate([prompt], num_samples=1, max_new_tokens=T, seed=[seeds[i * G + j]],
                                    tools=tools)[0][0]
            assert (alone.tokens, alone.loss_mask, alone.tool_calls) == \
                (whole[i][j].tokens, whole[i][j].loss_mask, whole[i][j].tool_calls)
            assert alone.logprobs == pytest.approx(whole[i][j].logprobs, abs=1e-5)
    # the sampler's log-probs are the model's on the whole sequence, forced tokens included in what it attends to
    rows = [(prompts[r // G], c.tokens) for r, c in enumerate(flat)]
    with torch.no_grad():
        lp = completion_logprobs(model, rows, tok.pad_id, 1024, 1.0, "cpu")
    for b, c in enumerate(flat):
        mask = torch.tensor(c.loss_mask, dtype=torch.bool)
        assert torch.allclose(lp[b, :len(c.tokens)][mask], torch.tensor(c.logprobs)[mask], atol=1e-4)


def test_an_answer_past_the_token_budget_is_cut(tiny):
    model, tok = tiny
    long_answer = EchoTools(range(0, 400))  # every token calls: each answer is forced right after
    out = Engine(model, tok).generate([tok.encode("hi")], max_new_tokens=5, seed=0, tools=long_answer)[0][0]
    assert len(out.tokens) == 5 and out.finish_reason == "length" and out.loss_mask[0] == 1
    assert out.loss_mask[1:] == [0] * 4  # the first answer alone fills the rest of the budget


def test_every_bad_call_is_an_error_result_the_model_reads():
    """Malformed JSON, an unknown tool, a bad expression, a timeout, output that is not UTF-8, an exception, a call
    left unclosed at the turn's end and one past max_tool_calls: each comes back as an error result the row goes on
    after, and each is counted; nothing raises."""
    tok = Tokenizer.from_pretrained(os.path.join(FIXTURES, "qwen2.5"))
    header = tok.encode("<|im_start|>assistant\n")

    def turn(*calls):
        return "\n".join(f"<tool_call>\n{c}\n</tool_call>" for c in calls)

    turns = [turn('{"name": "calculator", "arguments": {"expression": "1+"}}', '{"name": calculator}',
                  '{"name": "nope", "arguments": {}}'),
             turn('{"name": "python", "arguments": {"code": "import time\\ntime.sleep(30)"}}',
                  '{"name": "python", "arguments": {"code": "import sys\\nsys.stdout.buffer.write(b\'\\\\xff\')"}}',
                  '{"name": "python", "arguments": {"code": "1/0"}}'),
             '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2"',
             turn('{"name": "calculator", "arguments": {"expression": "3"}}'),
             "All tools failed."]
    turn_ids = [tok.encode(t) + [tok.token_to_id("<|im_end|>")] for t in turns]
    prompt = tok.apply_chat_template([user("q")], tools=TOOLS)

    def next_logits(history):  # write turn k after the k-th assistant header, whatever the tool turns held
        done = history[len(prompt):]
        starts = [i + len(header) for i in range(len(done)) if done[i:i + len(header)] == header]
        k, i = len(starts), len(done) - (starts[-1] if starts else 0)
        logits = torch.full((tok.vocab_size,), -30.0)
        logits[turn_ids[k][i] if k < len(turn_ids) and i < len(turn_ids[k]) else tok.eos_id] = 30.0
        return logits

    use = ToolUse(tok, ["calculator", "python"], max_calls=7, timeout=1.0)
    out = Engine(ScriptedLM(tok.vocab_size, next_logits), tok).generate([prompt], max_new_tokens=700,
                                                                        temperature=0.0, tools=use)[0][0]
    assert out.finish_reason == "stop" and out.text.endswith("All tools failed.")
    errors = [c["error"] for c in out.tool_calls]
    assert errors == ["bad expression", "malformed call", "unknown tool", "timeout", "output is not UTF-8",
                      "ZeroDivisionError", "unclosed call", "too many calls"]
    assert all(c["result"].startswith("Error") or "Error" in c["result"] for c in out.tool_calls)
    assert out.transcript.count("<tool_response>") == 8  # the model read every one


# ---- calls that do not stall the batch, answers fed in one forward -------------------------------------------------


def test_a_row_waiting_for_its_call_does_not_stop_the_others():
    """Row 0's call answers only once the batch has taken 10 more tokens (at most 10 s): a batch that stalled for the
    call would never take them, and the answer would read [stalled]. Row 1 never calls and decodes meanwhile."""
    tok = Tokenizer.from_pretrained(os.path.join(FIXTURES, "qwen2.5"))
    trigger, plain = tok.encode("!")[0], tok.encode("a")[0]
    taken = [0]

    def next_logits(history):  # prompt [1] writes the trigger, then plain tokens; prompt [2] plain tokens only
        logits = torch.full((tok.vocab_size,), -30.0)
        logits[trigger if history[0] == 1 and len(history) == 1 else plain] = 30.0
        return logits

    class Patient(EchoTools):
        def answer(self, call):
            start, deadline = taken[0], time.monotonic() + 10
            while taken[0] < start + 10 and time.monotonic() < deadline:
                time.sleep(0.001)
            call.result = " [ok]" if taken[0] >= start + 10 else " [stalled]"

    out = Engine(ScriptedLM(tok.vocab_size, next_logits), tok).generate(
        [[1], [2]], max_new_tokens=30, temperature=0.0, ignore_eos=True, tools=Patient([trigger], sleep=lambda: 0),
        on_tokens=lambda row, ids: taken.__setitem__(0, taken[0] + len(ids)))
    assert out[0][0].transcript.startswith("! [ok]") and out[0][0].tool_calls[0]["result"] == " [ok]"
    assert out[1][0].tokens == [plain] * 30


@pytest.fixture(scope="module")
def tiny64(tiny, tmp_path_factory):
    """The tiny model in fp64: comparisons of completions taken on different paths, where rounding cannot decide."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny64") / "m", seed=3)
    return Transformer.from_pretrained(path, dtype=torch.float64), tiny[1]


def _rollouts(engine, prompts, tools, seeds, G=4, T=40):
    out = engine.generate(prompts, num_samples=G, max_new_tokens=T, seed=seeds, tools=tools)
    return [c for group in out for c in group]


def test_completions_depend_neither_on_when_answers_arrive_nor_on_the_batch(tiny64):
    """The same rows with a tool that answers at once, and with one that sleeps a random 0-30 ms per call on worker
    threads: one batch, and the rows split over two 'ranks' as tasks.sample_problems splits them (problems r, r+2, ...)
    -- the same completions. (train_grpo under torchrun x2 with the real tools: tests/test_tools_tiny.py.)"""
    model, tok = tiny64
    prompts = [tok.encode(t) for t in ("What is 3 + 4?", "What is 12 + 1? <think>", "7", "Add 5 and 9.")]
    G = 4
    seeds = [100 + r for r in range(len(prompts) * G)]
    engine, triggers = Engine(model, tok), range(60, 140)
    at_once = _rollouts(engine, prompts, EchoTools(triggers), seeds)
    assert sum(len(c.tool_calls) for c in at_once) >= 8
    sleepy = EchoTools(triggers, sleep=lambda: random.uniform(0, 0.03))
    one_batch = _rollouts(engine, prompts, sleepy, seeds)
    ranks = [_rollouts(engine, prompts[r::2], sleepy, [s for i in range(r, 4, 2) for s in seeds[i * G:(i + 1) * G]])
             for r in range(2)]
    two_ranks = [ranks[i % 2][(i // 2) * G + j] for i in range(4) for j in range(G)]  # back in problem order
    for other in (one_batch, two_ranks):
        for a, b in zip(at_once, other):
            assert (a.tokens, a.loss_mask, a.tool_calls, a.finish_reason) == \
                (b.tokens, b.loss_mask, b.tool_calls, b.finish_reason)
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-10)


def test_an_answer_fed_in_one_forward_gives_the_logits_of_the_whole_sequence(tiny):
    """After each answer, the row's next-token logits equal those of prompt + completion so far run in one forward
    without a cache (fp32, 1e-5), for answers of different lengths fed together right-padded."""
    model, tok = tiny
    engine = Engine(model, tok, compact_frac=1.0)  # no compaction: batch row k is completion k throughout
    fed, inner = [], engine._feed

    def record(cache, logits, answers):
        out = inner(cache, logits, answers)
        fed.extend((k, out[k].clone()) for k, _ in answers)
        return out

    engine._feed = record
    prompts = [tok.encode(t) for t in ("What is 3 + 4?", "7", "Add 5 and 9.")]
    flat = _rollouts(engine, prompts, EchoTools(range(60, 140)), [7 + r for r in range(12)])
    assert len({len(c.tokens) - c.loss_mask.count(1) for c in flat}) > 1 and len(fed) >= 6
    for n, (k, logits) in enumerate(fed):
        c, seen = flat[k], sum(1 for j, _ in fed[:n] if j == k)
        runs = [i for i in range(1, len(c.tokens) + 1) if c.loss_mask[i - 1] == 0 and
                (i == len(c.tokens) or c.loss_mask[i] == 1)]  # the ends of the forced runs, in order
        with torch.no_grad():
            full = model(torch.tensor([prompts[k // 4] + c.tokens[:runs[seen]]]))[0, -1]
        assert (logits - full).abs().max() <= 1e-5


def test_graph_mode_logic_with_tools_on_cpu(tiny64, monkeypatch):
    """The CUDA-graph path's logic with tools (capture replaced by rerunning the step on the same static buffers):
    the plain decode step stays the captured one, rows waiting for answers are masked in it, answers are fed outside
    it; the same completions as the dynamic path."""
    model, tok = tiny64
    monkeypatch.setattr(Engine, "_capture", lambda self, step, restore: (step(), restore(), step)[-1])
    prompts = [tok.encode(t) for t in ("What is 3 + 4?", "7")]
    tools, seeds = EchoTools(range(60, 140), sleep=lambda: random.uniform(0, 0.01)), [11 + r for r in range(8)]
    ref = _rollouts(Engine(model, tok), prompts, tools, seeds)
    graphs = Engine(model, tok, cuda_graphs=True)
    out = _rollouts(graphs, prompts, tools, seeds)
    assert graphs._graphs and sum(len(c.tool_calls) for c in ref) >= 4
    for a, b in zip(ref, out):
        assert (a.tokens, a.loss_mask, a.tool_calls) == (b.tokens, b.loss_mask, b.tool_calls)
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-10)


def test_every_forced_token_is_streamed_even_an_answer_that_fills_the_budget(tiny):
    """on_tokens sees each row's tokens exactly once and in order, the tool answers included: also the last answer,
    which fills the budget and so is never fed to the model."""
    model, tok = tiny
    streamed = {}
    out = Engine(model, tok).generate([tok.encode("hi"), tok.encode("7")], num_samples=2, max_new_tokens=9, seed=1,
                                      tools=EchoTools(range(0, 400)),
                                      on_tokens=lambda r, ids: streamed.setdefault(r, []).extend(ids))
    flat = [c for group in out for c in group]
    assert all(c.finish_reason == "length" and c.loss_mask[-1] == 0 for c in flat)  # each ends inside an answer
    assert [streamed[r] for r in range(4)] == [c.tokens for c in flat]
