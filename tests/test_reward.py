"""Tests for the non-math rewards (format, language, countdown), the reward
combiner, and property/fuzz tests: no reward raises or takes over 50 ms on
arbitrary text up to 20k characters."""
import gc
import os
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reward  # noqa: E402
from reward import (  # noqa: E402
    REWARDS, RewardFn, accuracy_reward, combine_rewards, countdown_reward, extract_answer, format_reward,
    is_equiv, language_consistency_reward, parse_reward_spec,
)


# ---------------------------------------------------------------- format
@pytest.mark.parametrize("completion,mode,think_in_prompt,expected", [
    ("<think>2+2=4</think>The answer is 4.", "strict", False, 1.0),
    ("  \n<think>2+2=4</think>\n\\boxed{4}", "strict", False, 1.0),  # leading whitespace is fine
    ("<think>2+2=4</think>", "strict", False, 0.0),  # no answer
    ("<think>  </think>4", "strict", False, 0.0),  # empty reasoning
    ("<think>a</think>4<think>b</think>5", "strict", False, 0.0),  # two think blocks
    ("<think>a<think>b</think>4", "strict", False, 0.0),
    ("hello <think>a</think>4", "strict", False, 0.0),  # text before <think>
    ("</think>4<think>", "strict", False, 0.0),
    ("2+2=4</think>The answer is 4.", "strict", True, 1.0),  # prompt ended with "<think>\n"
    ("<think>2+2=4</think>4", "strict", True, 0.0),  # re-opened an already open think block
    ("2+2=4 and no close tag", "strict", True, 0.0),
    ("hello <think>a</think>", "soft", False, 1.0),
    ("</think> <think>", "soft", False, 0.0),
    ("no tags", "soft", False, 0.0),
    ("reasoning</think>", "soft", True, 1.0),
    ("<think>r</think> <answer>4</answer>", "answer_tag", False, 1.0),
    ("<think>r</think>\n<answer>4</answer>\n", "answer_tag", False, 1.0),
    ("<think>r</think> <answer> </answer>", "answer_tag", False, 0.0),
    ("<think>r</think> <answer>4</answer> trailing", "answer_tag", False, 0.0),
    ("<think>r</think> 4", "answer_tag", False, 0.0),
    ("<think>r</think><answer>4</answer><answer>5</answer>", "answer_tag", False, 0.0),
    ("r</think><answer>4</answer>", "answer_tag", True, 1.0),
    (None, "strict", False, 0.0),
])
def test_format_reward(completion, mode, think_in_prompt, expected):
    assert format_reward(completion, mode=mode, think_in_prompt=think_in_prompt) == expected


def test_format_reward_bad_mode_is_loud():
    with pytest.raises(ValueError, match="mode"):
        format_reward("<think>a</think>b", mode="lenient")


# ---------------------------------------------------------------- language
def test_language_consistency():
    assert language_consistency_reward("<think>We add two and two.</think>答案是4", "en") == 1.0
    assert language_consistency_reward("<think>我们计算</think>", "zh") == 1.0
    assert language_consistency_reward("<think>我们计算</think>", "en") == 0.0
    # 2 Latin words, 2 Han characters
    assert language_consistency_reward("<think>hello 世界 world</think>", "en") == 0.5
    assert language_consistency_reward("<think>hello 世界 world</think>", "zh") == 0.5
    # 6 Han characters + the variable x; LaTeX commands and digits are ignored
    assert language_consistency_reward("<think>我们计算 x 的值 \\frac{1}{2}</think>", "zh") == pytest.approx(6 / 7)
    assert language_consistency_reward("no tags: the whole text is the CoT", "en") == 1.0
    assert language_consistency_reward("reasoning in English</think>答案", "en") == 1.0  # think in prompt
    assert language_consistency_reward("<think>truncated English", "en") == 1.0
    assert language_consistency_reward("<think></think>answer", "en") == 0.0  # empty CoT
    assert language_consistency_reward("<think>1 + 2 = 3</think>", "en") == 0.0  # no words
    assert language_consistency_reward("<think>Привет мир hello</think>", "ru") == pytest.approx(2 / 3)
    assert language_consistency_reward(None, "en") == 0.0
    with pytest.raises(ValueError, match="language"):
        language_consistency_reward("x", "xx")


# ---------------------------------------------------------------- countdown
@pytest.mark.parametrize("completion,numbers,target,expected", [
    ("<answer>(1 + 2) * 3</answer>", [1, 2, 3], 9, 1.0),
    ("<answer>(1 + 2) * 3 = 9</answer>", [3, 2, 1], 9, 1.0),
    ("<think>try</think><answer>(100 - 4) / 4 + 1</answer>", [100, 4, 4, 1], 25, 1.0),
    ("<answer>6 / (1 - 3/4)</answer>", [6, 1, 3, 4], 24, 1.0),  # exact fractions
    ("\\boxed{2 \\times 3 + 4}", [2, 3, 4], 10, 1.0),
    ("<answer>1 + 2 * 3</answer>", [1, 2, 3], 9, 0.0),  # wrong value
    ("<answer>(1 + 2) * 3</answer>", [1, 2, 3, 4], 9, 0.0),  # not all numbers used
    ("<answer>(1 + 2) * 3 * 1</answer>", [1, 2, 3], 9, 0.0),  # a number used twice
    ("<answer>9</answer>", [1, 2, 3], 9, 0.0),
    ("<answer>3 ** 2</answer>", [3, 2], 9, 0.0),  # only + - * /
    ("<answer>3(2+1)</answer>", [3, 2, 1], 9, 0.0),  # no implicit products
    ("<answer>__import__('os').system('ls')</answer>", [1], 1, 0.0),
    ("<answer>5 / (2 - 2)</answer>", [5, 2, 2], 1, 0.0),  # division by zero
    ("<answer>9**9**9</answer>", [9, 9, 9], 1, 0.0),
    ("no answer", [1, 2], 3, 0.0),
])
def test_countdown_reward(completion, numbers, target, expected):
    assert countdown_reward(completion, numbers, target) == expected


# ---------------------------------------------------------------- combiner
def test_parse_reward_spec():
    assert parse_reward_spec("accuracy:1,format:0.5,language:0.2") == {"accuracy": 1.0, "format": 0.5, "language": 0.2}
    assert parse_reward_spec(" accuracy : 2 , format") == {"accuracy": 2.0, "format": 1.0}
    with pytest.raises(ValueError, match=r"'acuracy'.*valid rewards: accuracy, format"):
        parse_reward_spec("acuracy:1")
    for bad in ("accuracy:one", "accuracy:1,accuracy:2", "accuracy:nan", "accuracy:", "", "accuracy:1,"):
        with pytest.raises(ValueError, match=repr(bad).replace("(", r"\(") if bad else "reward"):
            parse_reward_spec(bad)


def test_combined_reward_logs_each_part():
    fn = combine_rewards("accuracy:1,format:0.5,language:0.2")
    assert isinstance(fn, RewardFn)
    completion = "<think>Two plus two is four.</think> The answer is \\boxed{4}."
    total, parts = fn(completion, {"answer": "4", "lang": "en"})
    assert parts == {"accuracy": 1.0, "format": 1.0, "language": 1.0}
    assert total == pytest.approx(1.7)
    total, parts = fn("\\boxed{5}", {"answer": "4"})
    assert parts == {"accuracy": 0.0, "format": 0.0, "language": 0.0} and total == 0.0
    total, parts = combine_rewards({"countdown": 2.0})("<answer>1+2</answer>", {"numbers": [1, 2], "target": 3})
    assert (total, parts) == (2.0, {"countdown": 1.0})
    with pytest.raises(KeyError):  # a dataset row without the field is a loud error
        fn("\\boxed{4}", {"question": "?"})
    with pytest.raises(ValueError):
        combine_rewards({"bogus": 1.0})


def test_registry_names():
    assert {"accuracy", "format", "language", "countdown", "code"} <= set(REWARDS)


# ---------------------------------------------------------------- robustness
LIMIT_S = 0.050  # the requirement: every reward call on arbitrary text under 50 ms

NASTY = [
    "\\boxed{" * 5000, "{" * 20000, "}" * 20000, "9**9**9", "9^{9^{9^{9}}}", "1" * 20000, "<think>" * 3000,
    "</think>" * 2500, "<answer>" * 2000 + "</answer>" * 2000, "\\frac{" * 3000 + "1" + "}{2}" * 3000,
    "\\sqrt{" * 4000, "(" * 10000 + ")" * 10000, "-" * 19999 + "1", "1e99999999999", "10^{10^{10^{10}}}",
    "\\boxed{" + "(" * 500 + "1" + ")" * 500 + "}", "1,000," * 3000, "the answer is " * 1400, "####" * 5000,
    "$" * 20000, " " * 20000, "\n" * 20000, "中" * 20000, "a" * 20000, "ab " * 6000, "\\text{" * 4000,
    "\\left(" * 3000, "x^" * 9000 + "x", "1/" * 9000 + "1", "!" * 20000, "0." * 9000, "e" * 20000,
    "\\boxed{" + "x+" * 5000 + "1}", "\\boxed{" + "1," * 5000 + "1}", "\\{" * 5000, "\x00\x01\x02" * 5000,
    "```python\n" * 2000, "\\boxed{\\frac{1}{0}}", "\\boxed{0^{-1}}", "\\boxed{(-8)^{1/3}}", "\\boxed{e^{e^{e^{e^{9}}}}}",
    "\\boxed{\\sin(10^{300})}", "\\boxed{170!}", "\\boxed{171!}", "\\boxed{(1e300)*(1e300)}", "\\boxed{2^{0.5^{-100}}}",
]
NUMBERS, TARGET = [1, 2, 3, 4], 10


def _all_rewards(text, other):
    """Every text-in reward function (code_reward has its own timeout test)."""
    return [
        lambda: extract_answer(text),
        lambda: is_equiv(text, other),
        lambda: is_equiv(other, text),
        lambda: is_equiv(text, text + "1"),
        lambda: is_equiv(extract_answer(text), extract_answer(other)),
        lambda: accuracy_reward(text, other),
        lambda: accuracy_reward(text, "\\frac{1}{2}"),
        lambda: format_reward(text, "strict"),
        lambda: format_reward(text, "soft", think_in_prompt=True),
        lambda: format_reward(text, "answer_tag"),
        lambda: language_consistency_reward(text, "en"),
        lambda: language_consistency_reward(text, "zh"),
        lambda: countdown_reward(text, NUMBERS, TARGET),
    ]


def _timed(call):
    reward._canon.cache_clear()  # always time the cold path: no help from earlier calls
    reward._value.cache_clear()
    gc.disable()  # a collection triggered by hypothesis' garbage is not the reward's time
    try:
        start = time.perf_counter()
        out = call()
        return out, time.perf_counter() - start
    finally:
        gc.enable()


def _check_fast_and_total(text, other):
    for call in _all_rewards(text, other):
        out, elapsed = _timed(call)
        assert out is None or isinstance(out, (bool, float, str))
        # The work is deterministic, so a slow input is slow on every try; re-timing
        # (best of 3) only filters scheduler noise from other processes on the machine.
        for _ in range(2):
            if elapsed < LIMIT_S:
                break
            elapsed = min(elapsed, _timed(call)[1])
        assert elapsed < LIMIT_S, f"{elapsed * 1e3:.1f} ms on {text[:60]!r}..."


@pytest.mark.parametrize("text", NASTY, ids=range(len(NASTY)))
def test_adversarial_inputs_are_fast_and_never_raise(text):
    _check_fast_and_total(text[:20000], "42")
    _check_fast_and_total("<think>x</think>\\boxed{" + text[:19000] + "}", text[:1000])


PIECES = st.sampled_from([
    "\\boxed{", "\\fbox{", "{", "}", "(", ")", "[", "]", "\\{", "\\}", "\\frac", "\\dfrac", "\\sqrt", "\\pi", "\\text{",
    "\\left(", "\\right)", "<think>", "</think>", "<answer>", "</answer>", "####", "the answer is ", "**", "^", "+", "-",
    "*", "/", "=", ",", ".", "%", "\\%", "$", "\\$", "!", "x", "y", "e", "i", "9", "0", "1", "12", "3.5", "1e5", "1,000",
    " ", "\n", "中文", "答案", "é", "\\cdot", "\\times", "\\cup", "\\infty", "^\\circ", " cm", "(A)", "B", "```python\n",
    "```", "\\", "\x00", "\U0001F600",
])
TEXTS = st.one_of(
    st.text(max_size=300),
    st.lists(PIECES, max_size=200).map("".join),
    st.tuples(st.lists(PIECES, min_size=1, max_size=30).map("".join), st.integers(1, 3000)).map(
        lambda t: (t[0] * t[1])[:20000]),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(TEXTS, TEXTS)
def test_fuzz_rewards_never_raise_and_stay_under_50ms(text, other):
    _check_fast_and_total(text, other[:2000])


@settings(max_examples=200, deadline=None)
@given(st.lists(PIECES, max_size=40).map("".join))
def test_fuzz_is_equiv_is_reflexive_on_nonempty_answers(text):
    # an answer always equals itself (unless it normalises to nothing)
    if reward._canon(text.strip()):
        assert is_equiv(text, text)


def test_answer_part_is_what_follows_the_last_think_close():
    assert reward.answer_part("<think>\\boxed{1}</think> so \\boxed{2}") == " so \\boxed{2}"
    assert reward.answer_part("a</think>b</think>c") == "c"
    assert reward.answer_part("no thinking \\boxed{3}") == "no thinking \\boxed{3}"
    assert reward.answer_part("</think>") == ""
