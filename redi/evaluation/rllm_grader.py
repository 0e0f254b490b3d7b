"""The paper's grader: rllm's math reward (redi-spec.md §5.5), reimplemented with a safe sympy path.

The REDI tables were scored by rllm's ``RewardMathFn``. Its rules, as implemented here:
- the response (stripped) must contain ``</think>``, else a format error; the solution is the text between
  the first and the second ``</think>``;
- the answer is the last ``\\boxed`` (``\\fbox`` if there is none), brace-matched; it must start with exactly
  ``\\boxed{``, else a format error;
- golds: a scalar becomes a one-element list; a gold containing ``\\boxed`` is replaced by its content; any
  gold matching is enough;
- a match is Hendrycks' string normalisation giving equal strings (:func:`mathd_normalize`) OR the sympy
  check (:func:`sympy_match`): rllm's ``_normalize``, then equal strings, or element-wise (tuples and
  intervals when the gold has several elements and the brackets agree) with three rules: two ``a/b``
  fractions must be identical (unreduced is not reduced), an integer must meet an integer (within 1e-7,
  so 2.00000001 is 2) or it fails, otherwise ``simplify(gold - pred) == 0``.

Security: sympy's ``parse_expr`` runs Python's ``eval`` on its input, and model output is untrusted. Before
anything is parsed, the expression must pass rllm's own filter (at most two distinct letters besides
``sqrt``/``frac``, no ``^{``, ``^(``, stacked or multi-digit powers) AND an allow-list of characters
(:data:`SAFE_EXPRESSION`: digits, lower-case letters, ``+-*/^().!`` and spaces; no quotes, underscores,
brackets or dots in names). Whatever passes is judged in worker processes with CPU-time and address-space
limits (redi.evaluation.grading.grade_many), so a pathological expression costs one wrong answer.
"""
from __future__ import annotations

import re

THINK_END = "</think>"

# --------------------------------------------------------------------------------------------- extraction


def solution_text(response: str) -> str | None:
    """Text between the first and second ``</think>``; None (format error) when there is none."""
    parts = response.strip().split(THINK_END)
    return parts[1] if len(parts) > 1 else None


def _balanced_from(text: str, start: int) -> str | None:
    """``text[start:]`` up to the brace that closes the first one opened, or None if it never closes."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i + 1]
    return None


def boxed_answer(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox``), rllm-style: exact ``\\boxed{`` prefix required."""
    if "\\boxed" not in text:
        return None
    start = text.rfind("\\boxed")
    whole = _balanced_from(text, start)
    if whole is None or not whole.startswith("\\boxed{"):
        return None
    return whole[len("\\boxed{"):-1]


def rllm_golds(answer) -> list[str]:
    """rllm's ground-truth handling: str() of each, ``\\boxed`` content when a gold holds one."""
    golds = list(answer) if isinstance(answer, (list, tuple)) else [answer]
    out = []
    for gold in golds:
        text = str(gold)
        if "\\boxed" in text:
            text = boxed_answer(text)
            if text is None:
                continue
        out.append(text)
    return out


# ----------------------------------------------------------------------------- Hendrycks normalisation


def _braced_fracs(s: str) -> str:
    # \frac12 -> \frac{1}{2}, \frac1{72} -> \frac{1}{72}; anything shorter is left as it was.
    head, *tails = s.split("\\frac")
    out = head
    for tail in tails:
        out += "\\frac"
        if not tail:
            raise ValueError("\\frac at the end")  # Hendrycks indexes tail[0] and fails: mathd compares raw
        if tail.startswith("{"):
            out += tail
            continue
        if len(tail) < 2:
            return s
        num, den, rest = tail[0], tail[1], tail[2:]
        out += "{" + num + "}" + (den + rest if den == "{" else "{" + den + "}" + rest)
    return out


def _slash_to_frac(s: str) -> str:
    parts = s.split("/")
    if len(parts) == 2 and re.fullmatch(r"-?\d+", parts[0]) and re.fullmatch(r"-?\d+", parts[1]):
        if s == f"{int(parts[0])}/{int(parts[1])}":
            return f"\\frac{{{int(parts[0])}}}{{{int(parts[1])}}}"
    return s


def _braced_sqrt(s: str) -> str:
    head, *tails = s.split("\\sqrt")
    if any(not t for t in tails):
        raise ValueError("\\sqrt at the end")  # as above
    return head + "".join("\\sqrt" + (t if t.startswith("{") else "{" + t[:1] + "}" + t[1:]) for t in tails)


def _hendrycks_strip(s: str) -> str:
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
        s = s.replace(old, new)
    if "\\text{ " in s:  # units on the right ("5 \text{ cm}"); more than one is Hendrycks' assertion error
        pieces = s.split("\\text{ ")
        if len(pieces) != 2:
            raise ValueError("several \\text{ } units")
        s = pieces[0]
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "x = 5" -> "5"
        s = sides[1]
    s = _braced_sqrt(s).replace(" ", "")
    s = _braced_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _slash_to_frac(s)


def mathd_normalize(answer: str) -> str:
    answer = answer.strip()
    try:
        text = re.search(r"^\\text\{(?P<text>.+?)\}", answer)
        if text is not None:
            answer = text.group("text").strip()
        return _hendrycks_strip(answer)
    except Exception:  # Hendrycks' function asserts on odd input; rllm then compares the stripped text
        return answer


# ---------------------------------------------------------------------------------- sympy normalisation

UNIT_WORDS = ("degree", "cm", "centimeter", "meter", "mile", "second", "minute", "hour", "day", "week", "month",
              "year", "foot", "feet", "inch", "yard")


def _without_thousands_commas(s: str) -> str:
    pattern = re.compile(r"(\d)(,)(\d\d\d)($|\D)")
    while True:
        after = pattern.sub(r"\1\3\4", s)
        if after == s:
            return s
        s = after


def _str_is_int(s: str) -> bool:
    """Within 1e-7 of an integer, once 1,000-style commas are dropped (nan and inf are not)."""
    try:
        value = float(_without_thousands_commas(s))
        return abs(value - round(value)) <= 1e-7
    except (ValueError, OverflowError):
        return False


def _latex_to_text(s: str) -> str:
    from pylatexenc import latex2text

    s = s.replace("\\tfrac", "\\frac").replace("\\dfrac", "\\frac").replace("\\frac", " \\frac")
    s = latex2text.LatexNodes2Text().latex_to_text(s)
    for old, new in (("√", "sqrt"), ("π", "pi"), ("∞", "inf"), ("∪", "U"), ("·", "*"), ("×", "*")):
        s = s.replace(old, new)
    return s.strip()


def sympy_normalize(s: str) -> str:
    text = re.search(r"^\\text\{(?P<text>.+?)\}", s)
    if text is not None:
        s = text.group("text")
    for old, new in (("\\%", "%"), ("\\$", "$"), ("$", ""), ("%", ""), (" or ", " , "), (" and ", " , "),
                     ("million", "*10^6"), ("billion", "*10^9"), ("trillion", "*10^12")):
        s = s.replace(old, new)
    for unit in UNIT_WORDS:
        s = re.sub(rf"{unit}(es)?(s)? *(\^[0-9]+)?", "", s)
    s = re.sub(r"\^ *\\circ", "", s)
    if s[:1] == "{" and s[-1:] == "}":
        s = s[1:-1]
    s = re.sub(r",\\! *", "", s)
    try:
        value = float(s)
        if abs(value - round(value)) <= 1e-7:
            s = str(int(round(value)))
    except (ValueError, OverflowError):
        pass
    if "\\" in s:
        try:
            s = _latex_to_text(s)
        except Exception:
            pass
    s = re.sub("- *", "-", s)
    s = re.sub("([0-9]) +([0-9])", r"\1+\2", s)  # a mixed number: "7 3/4" is 7+3/4
    s = s.replace(" ", "").replace("{", "").replace("}", "").lower()
    if _str_is_int(s):
        s = str(int(float(s.replace(",", ""))))  # int(), not round(): rllm truncates 2.99999999 to 2 here
    return s


# ------------------------------------------------------------------------------------- sympy equality

SAFE_EXPRESSION = re.compile(r"[0-9a-z+\-*/^().! ]*")
_RLLM_REFUSED = (re.compile(r"\^\{"), re.compile(r"\^\("), re.compile(r"\^[0-9]+\^"), re.compile(r"\^[0-9][0-9]+"))


def safe_to_parse(expr: str) -> bool:
    """rllm's filter (≤ 2 distinct letters besides sqrt/frac; no risky powers) AND the character allow-list."""
    letters = {c for c in expr.replace("sqrt", "").replace("frac", "") if c.isalpha()}
    if len(letters) > 2 or any(p.search(expr) for p in _RLLM_REFUSED):
        return False
    return SAFE_EXPRESSION.fullmatch(expr) is not None and "__" not in expr


def _sympy_zero(gold: str, pred: str) -> bool:
    """``simplify(gold - pred) == 0``, only for expressions that pass :func:`safe_to_parse`."""
    expr = f"({gold})-({pred})"
    if not safe_to_parse(expr):
        return False
    import sympy
    from sympy.parsing import sympy_parser

    transformations = sympy_parser.standard_transformations + (sympy_parser.implicit_multiplication_application,)
    try:
        return sympy.simplify(sympy_parser.parse_expr(expr.replace("^", "**"), transformations=transformations)) == 0
    except Exception:  # unparsable or unsimplifiable: not equal, as in rllm
        return False


def _elements(expr: str) -> list[str]:
    """A tuple or interval's elements (brackets at both ends, none inside); else the expression itself."""
    expr = _without_thousands_commas(expr)
    if not expr:
        return []
    brackets = "()[]"
    if len(expr) > 2 and expr[0] in brackets and expr[-1] in brackets and not any(c in brackets for c in expr[1:-1]):
        return [e.strip() for e in expr[1:-1].split(",")]
    return [expr]


_FRACTION = re.compile(r"^-?[0-9]+.?/0*[1-9][0-9]*.?$")


def _element_match(gold: str, pred: str) -> bool:
    if _FRACTION.search(gold) and _FRACTION.search(pred):
        return gold == pred
    if _str_is_int(gold) != _str_is_int(pred):
        return False
    return _sympy_zero(gold, pred)


def sympy_match(pred: str, gold: str) -> bool:
    g, p = sympy_normalize(gold), sympy_normalize(pred)
    if g == p:
        return True
    if not p:
        return False
    gold_elems, pred_elems = _elements(g), _elements(p)
    if len(gold_elems) > 1 and (g[0] != p[0] or g[-1] != p[-1]):
        return False  # an interval's brackets must agree
    if len(gold_elems) != len(pred_elems):
        return False
    return all(_element_match(a, b) for a, b in zip(gold_elems, pred_elems))


def mathd_equal(pred: str, gold: str) -> bool:
    return mathd_normalize(pred) == mathd_normalize(gold)


def rllm_equal(pred: str, gold: str) -> bool:
    return mathd_equal(pred, gold) or sympy_match(pred, gold)


def judge(prediction: str, golds: tuple[str, ...]) -> bool:
    """Any gold matching; the caller bounds time and memory (grading.grade_many's workers)."""
    return any(rllm_equal(prediction, gold) for gold in golds)
