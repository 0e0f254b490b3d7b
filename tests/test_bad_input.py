"""Issue 22 §2-§5: bad input tried as a new user would, from the CLI. Each gets one line naming the file, flag
or folder, exit code 2, no traceback; nothing the user passed in is changed, and a failed start leaves no run
folder or settings.json behind. docs/errors.md lists what each input gets."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "redi", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def _one_line_error(proc, *needles) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert "Traceback" not in err and "\n" not in err, err[-2000:]
    for needle in needles:
        assert needle in err, err
    return err


def _bench(tmp_path, n=5) -> Path:
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps({"problem": f"{i}+1=?", "answer": str(i + 1)}) + "\n" for i in range(n)))
    return path


def _eval(model, bench, out, *extra, env=None):
    return _run("eval", "--model", model, "--benchmark", bench, "--engine", "native", "--backend", "cpu",
                "--samples", "1", "--max-new-tokens", "4", "--output", out, "--workers", "1", *extra, env=env)


def _sft_rows(path: Path, n: int = 8) -> Path:
    lines = "".join(json.dumps({"prompt": f"{i}+1=?", "completion": str(i + 1)}) + "\n" for i in range(n))
    path.write_bytes(gzip.compress(lines.encode()) if path.suffix == ".gz" else lines.encode())
    return path


# ------------------------------------------------------------------------------------------------ redi eval


def test_eval_model_that_is_not_a_model_folder_leaves_no_settings(tmp_path, tiny_model_dir):
    """§3: a folder without config.json, or a run folder instead of RUN/final. The failed eval used to record
    settings.json with that --model, which then refused the corrected command as "other settings"."""
    bench, out = _bench(tmp_path), tmp_path / "eval"
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "final")
    (run / "config.yaml").write_text("stage: sft\n")
    (run / "metrics.jsonl").write_text("")
    _one_line_error(_eval(run, bench, out), f"--model {run} is a training run folder", f"did you mean {run / 'final'}?")
    assert not (out / "settings.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(_eval(empty, bench, out), f"--model {empty}: no config.json there")
    assert not (out / "settings.json").exists()
    fixed = _eval(run / "final", bench, out)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert len((out / "samples.jsonl").read_text().splitlines()) == 5


def test_sampling_flags_are_refused_before_the_model_loads(tmp_path, tiny_model_dir):
    """§2.4: -1 sampled greedily and top-p 2 acted as 1 (both recorded as given); top-p 0 crashed after load."""
    out = tmp_path / "eval"
    for flag, value, message in [("--temperature", "-1", "--temperature must be 0 (greedy) or more, got -1.0"),
                                 ("--top-p", "2", "--top-p must lie in (0, 1], got 2.0"),
                                 ("--top-p", "0", "--top-p must lie in (0, 1], got 0.0")]:
        _one_line_error(_eval(tiny_model_dir, _bench(tmp_path), out, flag, value), message)
        assert not out.exists()
    generated = _run("data", "generate", "--teacher", tiny_model_dir, "--problems", _bench(tmp_path),
                     "--output", tmp_path / "gen", "--engine", "native", "--backend", "cpu", "--top-p", "0")
    _one_line_error(generated, "--top-p must lie in (0, 1], got 0.0")


def test_eval_writes_samples_batch_by_batch_and_resumes_from_them(tmp_path, tiny_model_dir):
    """§2.3: an eval of 1,024 samples or fewer wrote nothing until it ended, so Ctrl-C lost all of them. Killed
    before its second batch, the first batch's samples are in samples.jsonl; the same command keeps them."""
    bench, out = _bench(tmp_path), tmp_path / "eval"
    args = ("--samples", "2", "--batch-size", "4")  # 5 problems x 2 samples: batches of 2 problems
    killed = _eval(tiny_model_dir, bench, out, *args, env={"REDI_KILL_AT": "eval_call@2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    first = (out / "samples.jsonl").read_text().splitlines()
    assert len(first) == 4 and all(line.endswith("}") for line in first)
    resumed = _eval(tiny_model_dir, bench, out, *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and len({(r["id"], r["sample"]) for r in rows}) == 10
    kept = [{k: r[k] for k in ("id", "sample", "response")} for r in rows[:4]]
    assert kept == [{k: json.loads(line)[k] for k in ("id", "sample", "response")} for line in first]


def test_interrupted_message_counts_complete_lines(tmp_path):
    from redi.evaluation.pipeline import count_samples

    path = tmp_path / "samples.jsonl"
    assert count_samples(path) == 0
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3')  # the last line is cut: not a sample
    assert count_samples(path) == 2


# ----------------------------------------------------------------------------------------------- redi train


@pytest.mark.parametrize("content", [b"", b"PAR1 this is not parquet"])
def test_train_on_an_unreadable_parquet_is_one_line_and_leaves_no_run(tmp_path, tiny_model_dir, content):
    """§3: a 0-byte or corrupt .parquet gave pyarrow's traceback and left an empty run folder."""
    data = tmp_path / "sft.parquet"
    data.write_bytes(content)
    out = tmp_path / "run"
    proc = _run("train", "--model", tiny_model_dir, "--data", data, "--output", out, "--backend", "cpu",
                "--stage", "sft", "--max-steps", "1")
    _one_line_error(proc, f"{data}: not a readable parquet file")
    assert not out.exists() and data.read_bytes() == content


def test_train_model_without_config_json_is_one_line_and_leaves_no_run(tmp_path, tiny_model_dir):
    """§3: a folder with a tokenizer but no config.json crashed in transformers and left config.yaml,
    metrics.jsonl and data_report.json behind."""
    model = tmp_path / "tokenizer-only"
    model.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tiny_model_dir) / name, model / name)
    out = tmp_path / "run"
    proc = _run("train", "--model", model, "--data", _sft_rows(tmp_path / "sft.jsonl"), "--output", out,
                "--backend", "cpu", "--stage", "sft", "--max-steps", "1")
    _one_line_error(proc, f"--model {model}: no config.json there")
    assert not out.exists()


def test_train_reads_gzipped_jsonl_like_data_pair(tmp_path, tiny_model_dir):
    """§5: `--data x.jsonl.gz` was taken for a datasets folder ("neither a Dataset directory ...")."""
    plain, packed = _sft_rows(tmp_path / "sft.jsonl"), _sft_rows(tmp_path / "sft.jsonl.gz")
    lines = []
    for data in (plain, packed):
        proc = _run("train", "--model", tiny_model_dir, "--data", data, "--output", tmp_path / "run",
                    "--backend", "cpu", "--stage", "sft", "--max-steps", "0")
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines.append(next(line for line in proc.stdout.splitlines() if line.startswith("sft:")))
    assert lines[0] == lines[1] and lines[0].startswith("sft: 8 of 8 rows kept")


# -------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_error_on_an_empty_folder_is_a_whole_sentence(tmp_path):
    """§5: the message stopped at transformers' first line, "Couldn't instantiate ... from one of:"."""
    from redi.errors import UserError
    from redi.training.api import load_tokenizer

    with pytest.raises(UserError) as caught:
        load_tokenizer(str(tmp_path))
    message = str(caught.value)
    assert message == (f"cannot load a tokenizer from {tmp_path}: no tokenizer files there (tokenizer.json, "
                       "or tokenizer_config.json with vocab.json and merges.txt)")


# ----------------------------------------------------------------------------------------------- redi grade


def test_grade_output_with_a_lone_surrogate_is_written_whole(tmp_path):
    """§3: an extracted answer holding a lone UTF-16 surrogate (valid JSON: "\\ud800") crashed the verdict
    write after grading, leaving a cut file."""
    responses = tmp_path / "r.jsonl"
    responses.write_text('{"id": 1, "response": "\\\\boxed{\\ud800}", "answer": "3"}\n'
                         '{"id": 2, "response": "\\\\boxed{3}", "answer": "3"}\n')
    verdicts = tmp_path / "v.jsonl"
    proc = _run("grade", responses, "-o", verdicts, "--json", "--workers", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in verdicts.read_text(encoding="utf-8").splitlines()]
    assert [r["extracted"] for r in rows] == ["\ud800", "3"] and [r["correct"] for r in rows] == [False, True]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_grade_never_writes_over_its_input(tmp_path):
    responses = tmp_path / "r.jsonl"
    responses.write_text('{"id": 1, "response": "\\\\boxed{3}", "answer": "3"}\n')
    before = responses.read_bytes()
    proc = _run("grade", responses, "-o", tmp_path / "." / "r.jsonl", "--workers", "0")
    _one_line_error(proc, "--output would replace the input file")
    assert responses.read_bytes() == before


# ----------------------------------------------------------------------------------------------- config


def test_a_key_in_the_wrong_section_suggests_where_it_lives():
    """§5: `pairs.alpha` got "did you mean pairs.epochs?"; alpha is a top-level key."""
    from redi.config import Config, apply_overrides
    from redi.errors import UserError

    with pytest.raises(UserError, match=r"unknown config key 'pairs.alpha' in --set; did you mean 'alpha'\?$"):
        apply_overrides(Config(), ["pairs.alpha=0.5"])
    with pytest.raises(UserError, match=r"did you mean 'pairs.learning_rate'\?$"):  # spelling still helps
        apply_overrides(Config(), ["pairs.learning_rat=1e-6"])


def test_tilde_in_a_recipe_reaches_the_loader_expanded(tmp_path, tiny_model_dir):
    """§5: `model: ~/models/x` passed the path check (which expanded ~) and failed in the loader with
    "Repo id must be ..."."""
    home = tmp_path / "home"
    shutil.copytree(tiny_model_dir, home / "models" / "x")
    _sft_rows(home / "sft.jsonl")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: ~/models/x\ndata: ~/sft.jsonl\nstage: sft\nbackend: cpu\n")
    proc = _run("train", "--config", recipe, "--output", tmp_path / "run", "--max-steps", "0",
                env={"HOME": str(home)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sft: 8 of 8 rows kept" in proc.stdout


def test_eval_and_generate_never_write_over_their_input(tmp_path, tiny_model_dir):
    """§2.1 for the other commands that write into a folder with --force: a benchmark or problems file that
    is the folder's samples.jsonl / traces.jsonl would have been appended to and rewritten."""
    for command, name, flag in (("eval", "samples.jsonl", "--benchmark"), ("data", "traces.jsonl", "--problems")):
        folder = tmp_path / command
        folder.mkdir()
        data = folder / name
        data.write_bytes(_bench(tmp_path).read_bytes())
        before = data.read_bytes()
        args = (["eval", "--model"] if command == "eval" else ["data", "generate", "--teacher"])
        proc = _run(*args, tiny_model_dir, flag, data, "--output", folder, "--force", "--engine", "native",
                    "--backend", "cpu", "--max-new-tokens", "4")
        _one_line_error(proc, f"--output would replace the input file {data}")
        assert data.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == [name]
