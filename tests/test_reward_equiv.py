"""Table-driven tests for answer extraction and math equivalence (reward.py)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from reward import accuracy_reward, extract_answer, is_equiv  # noqa: E402

T, F = True, False

# (prediction, gold, expected)
EQUIV_CASES = [
    # integers, signs, whitespace
    ("5", "5", T), ("5", "6", F), ("05", "5", T), ("-3", "-3", T), ("-3", "3", F),
    ("+3", "3", T), ("- 3", "-3", T), ("−3", "-3", T), (" 5 ", "5", T), ("5.", "5", T),
    ("0", "0.0", T), ("-0", "0", T), ("5", "-5", F), ("10", "1", F), ("2", "2x", F),
    ("123456789012345678901234567890", "123456789012345678901234567890", T),
    ("123456789012345678901234567890", "123456789012345678901234567891", F),
    ("1000000", "1000001", F),
    # decimals
    ("0.5", "5", F), ("0.5", ".5", T), ("0.50", "0.5", T), ("2.0", "2", T), ("3.14", "3.14159", F),
    ("0.1", "1/10", T), ("0.333", "1/3", F), ("1.25", "5/4", T), ("-0.75", "-3/4", T), ("0.1", "0.01", F),
    # thousands separators
    ("1,000", "1000", T), ("1,000", "1.000", F), ("1,000,000", "1000000", T), ("12,345.5", "12345.5", T),
    ("1,000", "100", F), ("1\\,000", "1000", T), ("1{,}000", "1000", T), ("-1,000", "-1000", T),
    # percentages
    ("50\\%", "50", T), ("50%", "0.5", T), ("50", "0.5", F), ("12.5\\%", "0.125", T), ("50%", "5", F),
    ("0.5", "50\\%", T),
    # fractions
    ("\\frac{1}{2}", "1/2", T), ("\\frac{1}{2}", "0.5", T), ("\\dfrac{3}{4}", "3/4", T), ("\\tfrac{3}{4}", "0.75", T),
    ("\\frac34", "3/4", T), ("\\frac{2}{4}", "\\frac{1}{2}", T), ("\\frac{1}{3}", "\\frac{1}{2}", F),
    ("-\\frac{1}{2}", "\\frac{-1}{2}", T), ("\\frac{1}{2}", "2", F), ("3/4", "4/3", F), ("1/2", "2/1", F),
    ("\\frac{1}{0}", "1", F), ("1/0", "2/0", F), ("0^{-1}", "1", F), ("\\frac{\\frac{1}{2}}{2}", "1/4", T),
    # mixed numbers
    ("2\\frac{1}{2}", "5/2", T), ("2\\frac{1}{2}", "2.5", T), ("2 1/2", "2.5", T), ("-1\\frac{1}{2}", "-1.5", T),
    ("2\\frac{1}{2}", "1", F), ("3\\frac{1}{4}", "3.25", T),
    # square roots
    ("\\sqrt{12}", "2\\sqrt{3}", T), ("\\sqrt{2}", "1.41421356", T), ("\\sqrt{2}", "1.414", F), ("\\sqrt2", "\\sqrt{2}", T),
    ("\\sqrt{4}", "2", T), ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", T), ("\\sqrt[3]{27}", "3", T),
    ("\\sqrt{8}", "2\\sqrt{3}", F), ("3\\sqrt{2}", "\\sqrt{18}", T), ("\\sqrt{-4}", "2i", T), ("√2", "\\sqrt{2}", T),
    # multiples of pi
    ("2\\pi", "\\pi+\\pi", T), ("\\frac{\\pi}{2}", "\\pi/2", T), ("\\pi", "3.14", F), ("\\pi", "3.14159265", T),
    ("6\\pi", "6pi", T), ("2\\pi", "\\pi", F), ("π/3", "\\frac{\\pi}{3}", T), ("\\frac{3\\pi}{4}", "0.75\\pi", T),
    # scientific notation and powers
    ("1.5e3", "1500", T), ("1.5E3", "1500", T), ("2.5\\times10^{-3}", "0.0025", T), ("6.02 \\times 10^{23}", "6.02e23", T),
    ("1e-5", "0.00001", T), ("1e5", "1e6", F), ("3 \\cdot 10^4", "30000", T), ("1e400", "1", F), ("100", "1e2", T),
    ("1e2", "10^2", T), ("2^{10}", "1024", T), ("2^10", "1024", T), ("2**10", "1024", T), ("9^{9^{9}}", "1", F),
    ("9**9**9", "0", F), ("2^{-1}", "0.5", T), ("(-2)^2", "4", T), ("-2^2", "-4", T), ("-2^2", "4", F),
    # units, \text, degrees, dollars
    ("5 \\text{ cm}", "5", T), ("5\\text{cm}^2", "5", T), ("10 \\text{ dollars}", "10", T), ("\\$10", "10", T),
    ("10 dollars", "10", T), ("12 cm", "12", T), ("12 cm", "13", F), ("30^\\circ", "30", T), ("30^{\\circ}", "30", T),
    ("30°", "30", T), ("90^\\circ", "\\frac{\\pi}{2}", F), ("\\text{5}", "5", T), ("\\mathrm{5}", "5", T),
    ("\\textbf{7}", "7", T), ("5 \\mbox{ meters}", "5", T), ("5 apples", "5", F), ("\\$5.00", "5", T), ("$5$", "5", T),
    ("\\text{Monday}", "Monday", T), ("Yes", "yes", T), ("no", "yes", F),
    # LaTeX spacing and delimiters
    ("\\left( 1, 2 \\right)", "(1,2)", T), ("\\!5", "5", T), ("\\displaystyle\\frac{1}{2}", "0.5", T), ("5\\;", "5", T),
    ("\\quad 5", "5", T), ("\\(5\\)", "5", T), ("\\[5\\]", "5", T), ("\\boxed{5}", "5", T),
    ("\\boxed{\\frac{1}{2}}", "0.5", T), ("\\fbox{3}", "3", T), ("\\frac{1}{2}", "\\boxed{0.5}", T),
    # a leading "x =" is not part of the answer
    ("x=3", "3", T), ("x = 3", "3", T), ("y=2x+1", "2x+1", T), ("3", "x=3", T), ("x=3", "4", F),
    ("k = \\frac{1}{2}", "0.5", T), ("\\theta = 30^\\circ", "30", T), ("x \\in [1,2]", "[1,2]", T), ("x=1, 2", "2, 1", T),
    # tuples, intervals, sets
    ("(1,2)", "(2,1)", F), ("(1,2)", "(1,2)", T), ("(1, 2)", "(1,2)", T), ("(0.5, 2)", "(\\frac{1}{2}, 2)", T),
    ("[1,2)", "[1,2)", T), ("[1,2)", "[1,2]", F), ("(1,2)", "[1,2]", F), ("(-\\infty, 3]", "(-\\infty,3]", T),
    ("(-\\infty, 3)", "(-\\infty,3]", F), ("\\{1,2,3\\}", "\\{3,2,1\\}", T), ("\\{1,2\\}", "\\{1,3\\}", F),
    ("(1,2,3)", "(1,2)", F), ("1, 2", "2, 1", T), ("1,2,3", "1,2", F), ("(3,-1)", "(3,-1)", T), ("(3,-1)", "(3,1)", F),
    ("(-\\infty,1)\\cup(2,\\infty)", "(2,\\infty)\\cup(-\\infty,1)", T), ("\\left[ 0, \\frac{1}{2} \\right]", "[0,0.5]", T),
    ("((1,2),(3,4))", "((1, 2), (3, 4))", T), ("((1,2),(3,4))", "((3,4),(1,2))", F), ("(1,2)", "5", F),
    ("\\{1, 2\\}", "(1, 2)", F), ("\\infty", "\\infty", T), ("\\infty", "-\\infty", F), ("(1, \\sqrt{4})", "(1, 2)", T),
    # multiple choice
    ("B", "B", T), ("(B)", "B", T), ("B", "(B)", T), ("\\text{(B)}", "B", T), ("B) 42", "B", T), ("b", "B", T),
    ("Option C", "C", T), ("C", "B", F), ("(A)", "B", F), ("Because", "B", F), ("\\textbf{(D)}", "D", T), ("E", "(E)", T),
    # algebraic expressions (random-point evaluation)
    ("x^2+2x+1", "(x+1)^2", T), ("(x+1)(x-1)", "x^2-1", T), ("2x", "x+x", T), ("2x", "x^2", F), ("x^2", "x**2", T),
    ("\\frac{x}{2}", "0.5x", T), ("\\frac{1}{x}", "x^{-1}", T), ("a+b", "b+a", T), ("a-b", "b-a", F), ("xy", "yx", T),
    ("2(x+y)", "2x+2y", T), ("x^2y", "yx^2", T), ("e^{x}", "\\exp(x)", T), ("\\ln(e^2)", "2", T), ("\\log(100)", "2", T),
    ("\\sin(\\pi/6)", "\\frac{1}{2}", T), ("\\cos(0)", "1", T), ("\\frac{x+1}{x-1}", "\\frac{x-1}{x+1}", F),
    ("3\\alpha", "\\alpha+2\\alpha", T), ("2\\theta", "\\theta", F), ("n(n+1)/2", "\\frac{n^2+n}{2}", T), ("x", "y", F),
    ("x^2+1", "x^2+1.001", F), ("\\frac{x^2-1}{x-1}", "x+1", T),
    # factorials and complex numbers
    ("5!", "120", T), ("3!", "5", F), ("3+4i", "4i+3", T), ("i^2", "-1", T), ("3+4i", "3-4i", F), ("e^{i\\pi}", "-1", T),
    # garbage and empties never match
    ("", "", F), ("0", "", F), ("", "0", F), (None, "1", F), ("1", None, F), ("\\frac{", "1", F), ("((((", "(", F),
    ("{}", "0", F), ("}{", "1", F), ("\\boxed{", "\\boxed{", T), ("x=", "3", F), ("=3", "3", F),
]


def test_table_is_big_enough():
    assert len(EQUIV_CASES) >= 150


@pytest.mark.parametrize("pred,gold,expected", EQUIV_CASES)
def test_is_equiv(pred, gold, expected):
    assert is_equiv(pred, gold) is expected


EXTRACT_CASES = [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{1} wait, actually \\boxed{2}", "2"),  # the last box wins
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),  # nested braces
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("final: \\fbox{7}", "7"),
    ("\\boxed{5} then a truncated \\boxed{", "5"),
    ("\\boxed 7$ done", "7"),
    ("<think>\\boxed{1}</think><answer>3</answer>", "3"),
    ("<answer>The answer is 5.</answer>", "5"),
    ("<answer> \\boxed{x+1} </answer>", "x+1"),
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
    ("#### 1,234\n", "1,234"),
    ("The final answer is $42$. I hope it is correct.", "42"),
    ("Therefore, the answer is: 3.5.", "3.5"),
    ("THE ANSWER IS 12", "12"),
    ("we get 3 apples and then -4.5 pears.", "-4.5"),
    ("x = -5", "-5"),
    ("in 2023-2024", "2024"),
    ("about 1,000,000 people", "1,000,000"),
    ("so 3/4 of them", "3/4"),
    ("no numbers here", None),
    ("", None),
    (None, None),
    ("<answer></answer>", None),
]


@pytest.mark.parametrize("text,expected", EXTRACT_CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("completion,answer,expected", [
    ("<think>2+2</think> The answer is \\boxed{4}.", "4", 1.0),
    ("<think>2+2</think> The answer is \\boxed{5}.", "4", 0.0),
    ("<think>it is \\boxed{4}</think> I am not sure.", "4", 0.0),  # thinking it is not answering it
    ("... so she earns \\boxed{\\$1,080}", "Each day ... 1080\n#### 1080", 1.0),  # GSM8K gold solution
    ("\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", 1.0),
    ("<answer>x = 3</answer>", "3", 1.0),
    ("no answer at all", "3", 0.0),
    (None, "3", 0.0),
])
def test_accuracy_reward(completion, answer, expected):
    assert accuracy_reward(completion, answer) == expected


@pytest.mark.parametrize("pred", ["A or B", "B, maybe C", "(B) or (C)", "A B C D", "B) 42 (D) 7"])
def test_multiple_choice_hedging_gets_no_credit(pred):
    assert not any(is_equiv(pred, letter) for letter in "ABCD")
