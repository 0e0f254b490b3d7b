"""Imported only in the judging processes' fork server: loads math-verify's LaTeX grammar and sympy
submodules there once (trusted constants), so each judging process starts warm."""
from redi.evaluation.grading import _math_verify

_math_verify()
