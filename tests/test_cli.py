"""Bad input gets one line naming the culprit, a non-zero exit, and no traceback."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


def redi(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "redi", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    return proc.returncode, proc.stdout, proc.stderr


def _one_line_error(code, out, err):
    assert code != 0
    assert "Traceback" not in err + out
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_unknown_set_key_suggests_closest(tmp_path):
    line = _one_line_error(*redi("train", "--output", str(tmp_path / "r"), "--set", "pairs.learning_rat=1e-6"))
    assert "pairs.learning_rat" in line and "did you mean 'pairs.learning_rate'" in line


def test_wrong_type_names_key(tmp_path):
    line = _one_line_error(*redi("train", "--output", str(tmp_path / "r"), "--set", "sft.batch_size=lots"))
    assert "sft.batch_size" in line and "int" in line


def test_missing_model_path_is_named(tmp_path):
    line = _one_line_error(*redi("train", "--backend", "cpu", "--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "r")))
    assert "no-model" in line and "not found" in line


def test_unknown_backend_lists_valid_ones(tmp_path):
    line = _one_line_error(*redi("train", "--backend", "tpu", "--output", str(tmp_path / "r")))
    assert "tpu" in line and "cpu" in line and "cuda" in line and "mlx" in line


def test_cuda_without_gpu_names_alternatives(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    line = _one_line_error(*redi("train", "--backend", "cuda", "--output", str(tmp_path / "r")))
    assert "CUDA" in line and "cpu" in line


def test_row_without_chosen_names_file_and_row(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n"
                    + json.dumps({"prompt": "1+2=", "rejected": "4"}) + "\n")
    line = _one_line_error(*redi("train", "--backend", "cpu", "--stage", "pairs", "--data", str(data),
                                 "--output", str(tmp_path / "r"), "--config", _tiny()))
    assert "pairs.jsonl row 2" in line and "chosen" in line


def test_cli_tiny_sft_writes_run_folder(tmp_path):
    code, out, err = redi("train", "--config", _tiny(), "--backend", "cpu", "--stage", "sft", "--max-steps", "5",
                          "--output", str(tmp_path / "X"))
    assert code == 0, err
    run = tmp_path / "X"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "final/model.safetensors"):
        assert (run / name).exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 5
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "final")
    try:
        import mlx_lm  # noqa: F401
    except ImportError:
        return
    from mlx_lm import load

    model, tokenizer = load(str(run / "final"))
    assert tokenizer.eos_token_id is not None


def _tiny():
    from pathlib import Path

    return str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
