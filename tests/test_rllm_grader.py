"""The paper's grader (rllm's math reward), case by case, with rllm's verdicts.

Where each expectation comes from: rllm's own code, repository rllm-org/rllm, files
``rllm/rewards/math_reward.py`` (RewardMathFn.__call__: "</think>" split, extract_answer, ground-truth list,
``grade_answer_mathd(...) or grade_answer_sympy(...)``) and ``rllm/rewards/math_utils/utils.py`` (named
functions below), and redi-spec.md §5.5, which summarises them. Each case names the function whose rule decides
it. rllm itself is not installed here (its package pulls a training stack); the verdicts are traced by hand
through those functions, and the math-verify column in scripts/compare_graders.py shows where the graders part.
"""
from __future__ import annotations

import os

import pytest

from redi.evaluation.grading import grade_many
from redi.evaluation.rllm_grader import mathd_normalize, safe_to_parse, sympy_normalize


def _r(answer: str, think: bool = True) -> str:
    return ("<think>\nreasoning</think>\n" if think else "") + f"The answer is $\\boxed{{{answer}}}$."


# (id, response, gold, correct, format_error, source)
CASES = [
    ("no-think", _r("5", think=False), "5", False, True,
     "math_reward.py: THOUGHT_DELIMITER_END not in response -> format_error_reward"),
    ("second-think", "<think>a</think> \\boxed{5} </think> \\boxed{6}", "5", True, False,
     "math_reward.py: model_response.split('</think>')[1] is the text between the first two </think>"),
    ("last-boxed", "<think>a</think> first \\boxed{3}, then \\boxed{5}", "5", True, False,
     "utils.py last_boxed_only_string: rfind('\\\\boxed')"),
    ("fbox-only", "<think>a</think> \\fbox{5}", "5", False, True,
     "utils.py extract_answer: needs '\\\\boxed' in the passage, else None -> format error"),
    ("boxed-space", "<think>a</think> \\boxed 5", "5", False, True,
     "utils.py remove_boxed: requires the exact prefix '\\\\boxed{' (no closing brace here either)"),
    ("dfrac", _r("\\dfrac{1}{2}"), "\\frac{1}{2}", True, False, "utils.py _strip_string: dfrac -> frac"),
    ("half", _r("0.5"), "\\frac{1}{2}", True, False, "utils.py _strip_string: '0.5' -> \\\\frac{1}{2}"),
    ("x-equals", _r("x = 5"), "5", True, False, "utils.py _strip_string: drops a <= 2-char 'x=' prefix"),
    ("degrees", _r("10^\\circ"), "10", True, False, "utils.py _strip_string: removes ^\\\\circ"),
    ("units", _r("5 \\text{ cm}"), "5", True, False, "utils.py _remove_right_units: '\\\\text{ ' splits units off"),
    ("sqrt", _r("2\\sqrt{3}"), "\\sqrt{12}", True, False,
     "utils.py are_equal_under_sympy: simplify(sqrt(12) - 2*sqrt(3)) == 0"),
    ("int-gold-strict", _r("\\frac{6}{2}"), "3", False, False,
     "utils.py grade_answer_sympy: _str_is_int(gold) != _str_is_int(pred) -> False (integer golds strict)"),
    ("unreduced", _r("\\frac{2}{4}"), "\\frac{1}{2}", False, False,
     "utils.py grade_answer_sympy: both _is_frac -> exact string match required (2/4 != 1/2)"),
    ("near-integer", _r("2.00000001"), "2", True, False,
     "utils.py _normalize: _is_int within 1e-7 -> '2'"),
    ("not-near", _r("2.0001"), "2", False, False,
     "utils.py grade_answer_sympy: gold is an integer, 2.0001 is not -> False"),
    ("list-any", _r("10"), ["x^{4}-2 x^{3}", "10"], True, False,
     "math_reward.py: a list of ground truths, any match counts"),
    ("amc-float", _r("142"), 142.0, True, False,
     "math_reward.py str(142.0) = '142.0'; utils.py _normalize turns an integer-valued float into '142'"),
    ("interval-brackets", _r("(1, 2)"), "[1, 2)", False, False,
     "utils.py grade_answer_sympy: several elements and the brackets differ -> False"),
    ("tuple-elementwise", _r("(\\frac{1}{2}, 3)"), "(0.5, 3)", True, False,
     "utils.py split_tuple + are_equal_under_sympy per element: 0.5 - 1/2 == 0, 3 == 3"),
    ("text-case", _r("evelyn"), "\\text{Evelyn}", True, False, "utils.py _normalize: lower-cases text answers"),
    ("mixed-number", _r("7 3/4"), "\\frac{31}{4}", True, False,
     "utils.py _inject_implicit_mixed_number: '7 3/4' -> 7+3/4; simplify(31/4 - (7+3/4)) == 0"),
    ("thousands", _r("1,000"), "1000", True, False, "utils.py _normalize: _str_is_int strips 1,000-style commas"),
    ("three-letters", _r("abc"), "cba", False, False,
     "utils.py should_allow_eval: more than 2 distinct letters -> sympy is never asked"),
    ("power-brace", _r("1024"), "2^{10}", False, False,
     "utils.py grade_answer_sympy: the gold 2^10 is not an integer string, the prediction is -> False"),
    ("million", _r("3 million"), "3000000", False, False,
     "utils.py _normalize: 'million' -> '*10^6', not an integer string while the gold is -> False"),
    ("empty-box", _r(""), "0", False, False, "utils.py grade_answer_sympy: empty normalised prediction -> False"),
]


def test_every_case_gets_rllms_verdict():
    verdicts = grade_many([c[1] for c in CASES], [c[2] for c in CASES], grader="rllm", workers=1)
    wrong = [(case_id, source) for (case_id, _, _, correct, fmt, source), v in zip(CASES, verdicts)
             if (v.correct, v.format_error) != (correct, fmt)]
    assert not wrong, wrong


def test_code_in_a_box_is_wrong_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    attacks = ["__import__('os').system('touch PWNED')", "(lambda: __import__('os').system('touch PWNED'))()",
               "x.__class__", "e^(__import__('os').system('touch PWNED'))", "eval('1')"]
    responses = [_r(a) for a in attacks]
    verdicts = grade_many(responses, ["0"] * len(attacks), grader="rllm", workers=1)
    assert [v.correct for v in verdicts] == [False] * len(attacks)
    assert not os.path.exists(tmp_path / "PWNED")
    # Refused before any parser sees them: the allow-list rejects quotes, underscores and dots in names.
    for attack in attacks:
        assert not safe_to_parse(f"(0)-({sympy_normalize(attack)})")


def test_allow_list_keeps_what_sympy_needs():
    for expr in ("(sqrt(12))-(2sqrt(3))", "(31/4)-(7+3/4)", "(0.5)-(1/2)", "(pi/2)-(pi)", "(5!)-(120)"):
        assert safe_to_parse(expr), expr
    # (pi)-(x): p, i and x are three letters, which rllm never hands to sympy.
    for expr in ("(pi)-(x)", "(a)-(bcd)", "(2^(10))-(1024)", "(x^{2})-(1)", "(2^10)-(1024)", "(f(x))-(x_1)", "('a')-(1)"):
        assert not safe_to_parse(expr), expr


def test_hendrycks_normalisation_examples():
    # Hendrycks' MATH _strip_string as rllm vendors it (utils.py): hand-checked outputs.
    assert mathd_normalize("\\left( 3, \\frac12 \\right)") == "(3,\\frac{1}{2})"
    assert mathd_normalize(" \\text{(B)} ") == "(B)"
    assert mathd_normalize("3/4") == "\\frac{3}{4}"
    assert mathd_normalize(".25") == "0.25"  # a leading zero is added
    assert mathd_normalize(".5") == "\\frac{1}{2}"  # ... and then the bare "0.5" becomes a fraction
    assert mathd_normalize("\\sqrt2") == "\\sqrt{2}"
    assert mathd_normalize("1 \\text{ m} \\text{ s}") == "1 \\text{ m} \\text{ s}"  # two units: left as stripped


@pytest.mark.parametrize("grader", ["rllm", "math-verify"])
def test_grader_flag_reaches_grade_file(tmp_path, grader):
    import json

    from redi.evaluation.grading import grade_file

    path = tmp_path / "r.jsonl"
    rows = [{"id": 1, "response": _r("\\frac{6}{2}"), "answer": "3"}, {"id": 2, "response": _r("7"), "answer": "7"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary, records = grade_file(path, workers=1, grader=grader, require_think=True)
    # 6/2 = 3: math-verify says equal; rllm's integer rule says no (see CASES "int-gold-strict").
    assert [r["correct"] for r in records] == ([False, True] if grader == "rllm" else [True, True])
    assert summary["pass@1"] == (0.5 if grader == "rllm" else 1.0)


def test_docs_grader_table_is_the_scripts_output():
    """docs/evaluation.md's 20-case comparison is generated by scripts/compare_graders.py; this keeps it true."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("compare_graders", root / "scripts" / "compare_graders.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.markdown(module.verdicts())
    assert table in (root / "docs" / "evaluation.md").read_text(encoding="utf-8")
    assert "6 of 20 cases differ." in table
