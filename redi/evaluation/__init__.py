"""Sampling on benchmarks and grading the answers (`redi eval`, `redi grade`)."""
