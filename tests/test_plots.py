"""The PNG plots: a collapsed arm that would flatten the others gets a zoomed second panel, and only then."""
from __future__ import annotations

import numpy as np

from redi.experiments.plots import plot_metric


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _runs(collapse_to: float) -> dict:
    steps = range(1, 51)
    healthy = {name: [{"step": s, "lp": -0.1 - 0.001 * k * s} for s in steps] for k, name in enumerate(("a", "b"))}
    return {**healthy, "bad": [{"step": s, "lp": -0.1 + (collapse_to + 0.1) * s / 50} for s in steps]}


def test_zoom_panel_only_when_a_collapsed_run_stretches_the_axis(tmp_path):
    one = plot_metric(_runs(-2.5), "lp", tmp_path / "wide.png", ylabel="y", zoom_without=frozenset({"bad"}))
    two = plot_metric(_runs(-0.16), "lp", tmp_path / "narrow.png", ylabel="y", zoom_without=frozenset({"bad"}))
    three = plot_metric(_runs(-2.5), "lp", tmp_path / "none.png", ylabel="y")
    w1, h1 = _png_size(one)
    w2, h2 = _png_size(two)
    w3, _ = _png_size(three)
    assert h1 == h2
    assert w2 == w3 and w1 > 1.5 * w2  # 12 vs 7 inches: the zoom panel was added only for the wide range


def test_points_with_null_values_are_skipped(tmp_path):
    runs = {"a": [{"step": 1, "lp": None}, {"step": 2, "lp": -0.1}, {"step": 3, "lp": float(np.float32(-0.2))}],
            "empty": []}
    path = plot_metric(runs, "lp", tmp_path / "p.png", ylabel="y")
    assert _png_size(path)[0] > 0
