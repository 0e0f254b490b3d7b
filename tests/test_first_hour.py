"""A new user's first hour (issue 15): wrong results caught, fast failures, one clear line each.

Each CLI check asserts the exit code, one line on stderr naming the culprit, no traceback, and that nothing
the user had was lost or overwritten.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def redi(*args, timeout=300, env=None, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "redi", *args], capture_output=True, text=True, timeout=timeout,
                          env={**ENV, **(env or {})}, cwd=cwd)
    return proc.returncode, proc.stdout, proc.stderr


def one_line(code, out, err, expect=2):
    assert code == expect, (code, out, err)
    assert "Traceback" not in out + err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------- 1: Ctrl-C


def _ctrl_c_reaches_python() -> None:
    # A shell starts background jobs with SIGINT ignored, and Python then installs no KeyboardInterrupt
    # handler: a suite launched that way (`bash .ci/run &`) would see the run finish. A terminal's Ctrl-C
    # meets the default disposition, so the child gets it back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_exits_130_and_says_how_to_resume(tmp_path):
    # Ctrl-C at a named point (the 5th metrics line), not after a timer: the tiny run can finish first.
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "redi", "train", "--config", TINY, "--backend", "cpu",
                           "--stage", "sft", "--max-steps", "400", "--save-every", "2", "--output", str(run)],
                          capture_output=True, text=True, env={**ENV, "REDI_KILL_AT": "metrics-append@5:SIGINT"},
                          timeout=240, preexec_fn=_ctrl_c_reaches_python)
    line = one_line(proc.returncode, proc.stdout, proc.stderr, expect=130)
    assert f"redi train --resume {run}" in line and "checkpoints/step-" in line and "sft step" in line
    assert len((run / "metrics.jsonl").read_text().splitlines()) < 400  # stopped early, not finished


# ----------------------------------------------------------------------------- 4: one non-UTF-8 byte

PAIR = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}


def _pairs_with_bad_byte(path: Path) -> Path:
    good = json.dumps(PAIR).encode()
    path.write_bytes(good + b"\n" + b'{"prompt": "caf\xe9", "chosen": "2", "rejected": "3"}\n' + good + b"\n")
    return path


def test_non_utf8_row_is_one_malformed_row(tmp_path):
    from redi.data import iter_rows

    rows = list(iter_rows(_pairs_with_bad_byte(tmp_path / "pairs.jsonl")))
    assert [n for n, _ in rows] == [1, 2, 3]
    assert rows[0][1] == PAIR and rows[2][1] == PAIR
    assert isinstance(rows[1][1], ValueError) and "not UTF-8" in str(rows[1][1])


def test_train_names_non_utf8_row_or_skips_it(tmp_path):
    data = _pairs_with_bad_byte(tmp_path / "pairs.jsonl")
    args = ["train", "--config", TINY, "--backend", "cpu", "--stage", "pairs", "--data", str(data), "--max-steps", "1"]
    line = one_line(*redi(*args, "--output", str(tmp_path / "a")))
    assert "pairs.jsonl row 2: not UTF-8" in line
    code, out, err = redi(*args, "--output", str(tmp_path / "b"), "--set", "on_malformed=skip")
    assert code == 0, err
    report = json.loads((tmp_path / "b" / "data_report.json").read_text())["pairs"]
    assert report["kept"] == 2 and report["dropped"] == {"malformed": 1}
    assert "row 2: not UTF-8" in report["malformed"][0]
    # 20: training turns use_cache off; the saved model gets the original value back.
    assert json.loads((tmp_path / "b" / "final" / "config.json").read_text())["use_cache"] is True


def test_grade_names_non_utf8_line(tmp_path):
    import pytest

    from redi.errors import UserError
    from redi.evaluation.grading import read_responses

    path = tmp_path / "responses.jsonl"
    good = json.dumps({"id": 1, "response": "\\boxed{2}", "answer": "2"}).encode()
    path.write_bytes(good + b"\n" + b'{"id": 2, "response": "\\\\boxed{\xff}", "answer": "2"}\n')
    with pytest.raises(UserError, match=r"responses.jsonl:2: not UTF-8"):
        read_responses(path)


# ----------------------------------------------------------------------------- 5: text that tokenizes to nothing


def _q_only_model(root: Path) -> Path:
    """A Qwen2 model whose byte-level vocabulary holds only 'q': any other text encodes to no ids."""
    from redi.tiny import build_model

    return build_model(root, alphabet="q")


def _write_pairs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rows_without_completion_tokens_are_dropped_and_counted(tmp_path):
    from transformers import AutoTokenizer

    from redi.data import Encoder, load_pairs

    model = _q_only_model(tmp_path / "m")
    rows = [{"prompt": "qq", "chosen": "q", "rejected": "qqq"}] * 3 + [{"prompt": "qq", "chosen": "7", "rejected": "q"}]
    encoder = Encoder(AutoTokenizer.from_pretrained(model), source=str(model))
    pairs, report = load_pairs(_write_pairs(tmp_path / "pairs.jsonl", rows), encoder, max_length=64)
    assert len(pairs) == 3 and report.dropped == {"no_completion_tokens": 1}
    assert all(len(p.chosen.completion) >= 2 and len(p.rejected.completion) >= 2 for p in pairs)  # text + EOS


def test_tokenizer_that_covers_nothing_stops_with_one_line(tmp_path):
    model = _q_only_model(tmp_path / "m")
    data = _write_pairs(tmp_path / "pairs.jsonl", [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i)}
                                                   for i in range(12)])
    line = one_line(*redi("train", "--config", TINY, "--backend", "cpu", "--stage", "pairs", "--model", str(model),
                          "--data", str(data), "--max-steps", "2", "--output", str(tmp_path / "run")))
    assert f"tokenizer at {model}" in line and "12 of 12 rows" in line


# ----------------------------------------------------------------------------- 8: missing paths fail at once


def _timed(*args, env=None, cwd=None):
    t0 = time.perf_counter()
    result = redi(*args, env=env, cwd=cwd)
    return time.perf_counter() - t0, result


def test_looks_local(tmp_path, monkeypatch):
    from redi.hub import looks_local

    monkeypatch.chdir(tmp_path)
    hub = ["Qwen/Qwen2.5-Math-1.5B", "open-r1/OpenR1-Math-220k", "runs/sftt"]
    local = ["./m", "/abs/m", "~/m", "a/b/c", "model", "bad/x.jsonl", "data/train.parquet"]
    assert [looks_local(s) for s in hub] == [False] * 3 and all(looks_local(s) for s in local)
    (tmp_path / "runs").mkdir()
    assert looks_local("runs/sftt")  # its first part is a local folder


def test_missing_local_looking_paths_fail_at_once(tmp_path, tiny_model_dir):
    data = _write_pairs(tmp_path / "pairs.jsonl", [PAIR] * 4)
    cases = [
        (["train", "--model", "runs/sftt", "--data", str(data)], "model path not found: runs/sftt", {}),
        (["train", "--model", tiny_model_dir, "--stage", "pairs", "--data", "bad/x.jsonl"],
         "data path not found: bad/x.jsonl", {}),
        (["data", "pair", "bad/x.jsonl"], "input not found: bad/x.jsonl", {}),
        # Not offline, but the hub cannot be reached: still one line, without the hub client's retries.
        (["train", "--model", "runs/sftt", "--data", str(data)], "the hub is unreachable",
         {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}),
    ]
    for i, (args, expected, env) in enumerate(cases):
        out = tmp_path / f"out{i}"
        # In an empty folder: `runs/sftt` is hub-shaped only while no local `runs/` exists.
        seconds, result = _timed(*args, "--output", str(out), env=env, cwd=tmp_path)
        line = one_line(*result)
        assert expected in line and "not" in line, line
        assert seconds < 25, (args, seconds)  # process start and imports; the hub retries took 30-50 s


# ----------------------------------------------------------------------------- 12, 19: redi data pair

FLAT = {"id": "p0", "problem": "1 + 1?", "answer": "2", "generations": ["3", "2"], "correct": [False, True]}


def data_pair(*args, capsys):
    from redi.cli.main import main

    code = main(["data", "pair", *map(str, args), "--workers", "0", "--shuffle-seed", "none"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_data_pair_with_no_pairs_exits_non_zero(tmp_path, capsys):
    every_row_bad = _write_pairs(tmp_path / "bad.jsonl", [{"id": "a", "problem": "x"}, {"id": "b", "problem": "y"}])
    line = one_line(*data_pair(every_row_bad, "--schema", "flat", "-o", tmp_path / "out", capsys=capsys))
    assert "no pairs came out of" in line and "malformed 2" in line and "report.json" in line
    all_correct = _write_pairs(tmp_path / "easy.jsonl", [{**FLAT, "correct": [True, True]}])
    line = one_line(*data_pair(all_correct, "-o", tmp_path / "out2", capsys=capsys))
    assert "no pairs came out of" in line
    assert json.loads((tmp_path / "out2" / "report.json").read_text())["sft_rows"] == 1  # the report is still there


def test_data_pair_refuses_a_non_empty_folder_without_force(tmp_path, capsys):
    traces = _write_pairs(tmp_path / "traces.jsonl", [FLAT, {**FLAT, "id": "p1"}])
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "pairs.jsonl").write_text("mine\n")
    line = one_line(*data_pair(traces, "-o", run, capsys=capsys))
    assert str(run) in line and "training run" in line and "--force" in line
    assert (run / "pairs.jsonl").read_text() == "mine\n" and sorted(p.name for p in run.iterdir()) == [
        "metrics.jsonl", "pairs.jsonl"]
    code, _, err = data_pair(traces, "-o", run, "--format", "jsonl", "--force", capsys=capsys)
    assert code == 0, err
    assert len((run / "pairs.jsonl").read_text().splitlines()) == 2 and (run / "metrics.jsonl").exists()


def test_row_numbers_are_one_based_in_pair_and_train(tmp_path, capsys):
    lines = [json.dumps(FLAT), "{not json", json.dumps({**FLAT, "id": "p2"})]
    (tmp_path / "traces.jsonl").write_text("\n".join(lines) + "\n")
    code, out, _ = data_pair(tmp_path / "traces.jsonl", "-o", tmp_path / "out", capsys=capsys)
    assert code == 0
    [entry] = json.loads((tmp_path / "out" / "report.json").read_text())["malformed"]
    assert entry["row"] == 2 and "line 2" in entry["reason"] and "malformed row 2" in out
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join([json.dumps(PAIR), "{not json", json.dumps(PAIR)]) + "\n")
    from redi.data import iter_rows

    assert [n for n, row in iter_rows(pairs) if isinstance(row, ValueError)] == [2]


# ----------------------------------------------------------------------------- 18: the knobs, findable


def test_version_short_help_and_config_show(capsys):
    from importlib.metadata import version

    from redi.cli.main import main

    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"redi {version('redi')}"
    assert main(["train", "-h"]) == 0 and "--max-steps" in capsys.readouterr().out
    assert main(["config", "show", "--set", "alpha=0.5", "--set", "pairs.learning_rate=2e-6"]) == 0
    lines = {line[2:].split()[0]: line for line in capsys.readouterr().out.splitlines()}
    from redi.config import valid_keys

    assert set(lines) == set(valid_keys())  # every key, and nothing else
    # Defaults are resolved for the default objective (redi): its paper values; keys it does not use
    # (beta, gamma) stay "paper-default", the value whichever objective a run picks would take.
    assert lines["alpha"].startswith("* ") and lines["alpha"].split()[2:] == ["0.5", "(default", "0.8)"]
    assert lines["pairs.learning_rate"].split()[2:] == ["2e-06", "(default", "1e-06)"]
    assert lines["beta"].split() == ["beta", "paper-default"]
    assert lines["seed"].split() == ["seed", "42"]


def test_docs_config_table_is_generated_from_the_code():
    from redi.config_docs import markdown_table

    page = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    table = page.split("<!-- config-keys:start -->\n")[1].split("<!-- config-keys:end -->")[0]
    assert table == markdown_table(), "docs/config.md's key table is stale: run `python scripts/sync_docs.py`"


# ----------------------------------------------------------------------------- 14: string rows skip the template


def test_system_prompt_with_string_rows_warns_once(tmp_path, tiny_tokenizer, capsys):
    from redi.data import Encoder, load_pairs

    data = _write_pairs(tmp_path / "pairs.jsonl", [PAIR] * 3)
    load_pairs(data, Encoder(tiny_tokenizer, system_prompt="Be brief."), max_length=64)
    err = capsys.readouterr().err
    assert err.count("warning: system_prompt is set but the rows are plain strings") == 1
    messages = {"prompt": [{"role": "user", "content": "1+1="}], "chosen": [{"role": "assistant", "content": "2"}],
                "rejected": [{"role": "assistant", "content": "3"}]}
    pairs, _ = load_pairs(_write_pairs(tmp_path / "m.jsonl", [messages]), Encoder(tiny_tokenizer, system_prompt="Be brief."),
                          max_length=256)
    assert capsys.readouterr().err == ""
    assert "Be brief." in tiny_tokenizer.decode(pairs[0].chosen.prompt.tolist())


# ----------------------------------------------------------------------------- 16: progress in a log file


def test_plain_progress_lines_when_not_a_terminal():
    import io

    from redi.training.progress import PlainProgress, make_progress

    assert isinstance(make_progress(), PlainProgress)  # pytest's captured stdout is not a terminal
    stream = io.StringIO()
    progress = PlainProgress(every=10, seconds=3600, stream=stream)
    task = progress.add_task("stage pairs", total=25, info="")
    long_info = "loss 0.5 " + "x" * 150
    for _ in range(25):
        progress.update(task, advance=1, info=long_info)
    lines = stream.getvalue().splitlines()
    assert [line.split(":")[1].split()[0] for line in lines] == ["1/25", "10/25", "20/25", "25/25"]
    assert all(long_info in line for line in lines)  # never cut at 80 columns
    stream = io.StringIO()
    slow = PlainProgress(every=1000, seconds=0.0, stream=stream)  # the time floor alone prints every update
    task = slow.add_task("reference log-probs", total=None, info="")
    for _ in range(3):
        slow.advance(task, 4)
    assert [line.split()[2] for line in stream.getvalue().splitlines()] == ["4", "8", "12"]


# ----------------------------------------------------------------------------- 9, 10, 21: check before training


def _sft_rows(n: int) -> list[dict]:
    return [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(n)]


def test_both_stages_are_checked_before_any_step_and_nothing_is_left(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    _write_pairs(data / "sft.jsonl", _sft_rows(20))
    (data / "pairs.jsonl").write_text("\n")  # an empty pair set
    run = tmp_path / "run"
    line = one_line(*redi("train", "--config", TINY, "--backend", "cpu", "--stage", "both", "--model", tiny_model_dir,
                          "--data", str(data), "--output", str(run)))
    assert "no usable pairs rows" in line and "pairs.jsonl" in line
    assert not run.exists()  # 21: no half-made run folder, and stage 1 never trained
    line = one_line(*redi("train", "--config", TINY, "--backend", "cpu", "--model", tiny_model_dir, "--output", str(run)))
    assert f"--model {tiny_model_dir} needs --data" in line  # 10: not the built-in toy set
    assert not run.exists()


def test_failed_start_keeps_an_existing_folder_and_its_files(tmp_path, tiny_model_dir):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    line = one_line(*redi("train", "--config", TINY, "--backend", "cpu", "--stage", "pairs", "--model", tiny_model_dir,
                          "--data", str(tmp_path / "missing.jsonl"), "--output", str(run)))
    assert "missing.jsonl" in line and (run / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- 11, 13, 20: dry run and accounts


def test_max_steps_0_checks_prints_the_plan_and_trains_nothing(tmp_path, tiny_model_dir):
    pairs = [PAIR] * 5 + [{"prompt": "", "chosen": "4", "rejected": "5"}, {"prompt": "2+2=", "chosen": "4", "rejected": "4"}]
    data = tmp_path / "data"
    data.mkdir()
    _write_pairs(data / "sft.jsonl", _sft_rows(40))
    _write_pairs(data / "pairs.jsonl", pairs + ["not an object"])
    run = tmp_path / "run"
    code, out, err = redi("train", "--config", TINY, "--backend", "cpu", "--stage", "both", "--model", tiny_model_dir,
                          "--data", str(data), "--output", str(run), "--max-steps", "0", "--max-length", "4096",
                          "--set", "on_malformed=skip")
    assert code == 0, err
    assert not run.exists()
    lines = out.splitlines()
    sft = next(line for line in lines if line.startswith("sft: "))
    pair = next(line for line in lines if line.startswith("pairs: "))
    # tiny.yaml: sft batch 16 (micro 8), 1 epoch -> 40 // 16 = 2 steps; pairs batch 8 > 7 kept rows.
    assert "40 of 40 rows kept" in sft and "2 steps of 16 sequences (micro-batches: at most 8 sequences, tokens: auto)" in sft
    assert "7 of 8 rows kept" in pair and "malformed 1" in pair and "1 step of 7 pairs" in pair
    assert "dry run" in out
    assert "pairs: " in err and "whole epoch" in err  # after the last merge of main the shrink wording changed: see the closing note
    assert "1 pairs have chosen == rejected" in err and "1 rows have an empty prompt" in err
    assert "max_length 4096 is above the model's max_position_embeddings 2048" in err  # 20
    code, _, err = redi("train", "--config", TINY, "--backend", "cpu", "--stage", "sft", "--objective", "dpo",
                        "--model", tiny_model_dir, "--data", str(data), "--output", str(run), "--max-steps", "0")
    assert code == 0 and "--objective dpo is ignored with --stage sft" in err  # 20


# ----------------------------------------------------------------------------- 15: resume says what it does


def test_resume_names_the_step_and_a_finished_run_is_left_alone(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--config", TINY, "--backend", "cpu", "--stage", "sft", "--max-steps", "4", "--save-every", "2"]
    code, _, err = redi(*args, "--output", str(run))
    assert code == 0, err
    final = (run / "final" / "model.safetensors").read_bytes()
    code, out, err = redi("train", "--resume", str(run))
    assert code == 0, err
    assert f"{run} already finished (4 steps); nothing to do" in out and "done:" not in out
    assert (run / "final" / "model.safetensors").read_bytes() == final
    # As if the run had been stopped after the step-2 checkpoint:
    import shutil

    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    code, out, err = redi("train", "--resume", str(run))
    assert code == 0, err
    assert f"resumed from sft step 2 of 4 (checkpoint {run / 'checkpoints' / 'step-2'})" in out
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
