"""`redi eval` says in one line why a table is all format errors, and names the flags that fit (issue 23).

The model under test always says <|im_end|> at once, so it never writes </think> nor a \\boxed{} answer:
a model that does not think, as SmolLM2-135M-Instruct is. Each rerun follows the previous line's advice,
which shows the advice is true: the format errors it names go away and the next cause shows.
"""
from __future__ import annotations

import json

from redi.cli.main import main
from redi.evaluation.advice import eval_advice
from redi.evaluation.pipeline import EvalSettings


def _bench(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps({"problem": f"{a}+{a}=?", "answer": str(2 * a)}) + "\n" for a in (1, 2, 3)))
    return str(path)


def _notes(capsys, model, bench, out, *flags) -> tuple[list[str], dict]:
    code = main(["eval", "--model", model, "--benchmark", bench, "--backend", "cpu", "--samples", "2",
                 "--max-new-tokens", "4", "--workers", "0", "--output", str(out), *flags])
    printed = capsys.readouterr().out
    assert code == 0, printed
    results = json.loads((out / "results.json").read_text())["bench"]
    return [line for line in printed.splitlines() if line.startswith("note:")], results


def test_eval_explains_a_model_that_does_not_think(tmp_path, capsys, im_end_model_dir):
    bench = _bench(tmp_path)
    # Defaults: forced <think>, the paper's template, the rllm grader.
    notes, results = _notes(capsys, im_end_model_dir, bench, tmp_path / "default")
    assert results["format_errors"] == 6 and results["missing_think"] == 6
    assert notes == ["note: 100% of samples never write </think>, which this run requires: the model does not "
                     "think. Rerun with --no-force-think --grader math-verify (rllm grades only the text after "
                     "</think>)."]
    # rllm alone still needs </think>: only the grader flag is named.
    notes, _ = _notes(capsys, im_end_model_dir, bench, tmp_path / "rllm", "--no-force-think")
    assert len(notes) == 1 and notes[0].endswith("Rerun with --grader math-verify (rllm grades only the text "
                                                 "after </think>).")
    # Following the advice: </think> is no longer the cause; the missing \boxed{} is.
    notes, results = _notes(capsys, im_end_model_dir, bench, tmp_path / "mv", "--no-force-think",
                            "--grader", "math-verify")
    assert results["missing_think"] == 6 and results["format_errors"] == 6
    assert notes == ["note: 100% of samples give no answer the grader can read; math-verify reads only the last "
                     "\\boxed{} (the model ignores the paper's instruction to write one); --grader "
                     "math-verify-unboxed reads the final text."]
    notes, _ = _notes(capsys, im_end_model_dir, bench, tmp_path / "raw", "--no-force-think", "--template", "raw")
    assert notes == ["note: 100% of samples give no answer the grader can read; math-verify reads only the last "
                     "\\boxed{} (--template paper asks the model for one); --grader math-verify-unboxed reads the "
                     "final text."]
    # An empty response holds no answer for math-verify either.
    notes, _ = _notes(capsys, im_end_model_dir, bench, tmp_path / "unboxed", "--no-force-think", "--grader",
                      "math-verify-unboxed")
    assert notes == ["note: 100% of samples give no answer the grader can read; math-verify found no answer in "
                     "their final text either."]


def _result(samples: int, missing: int, format_errors: int) -> dict:
    return {"samples": samples, "missing_think": missing, "format_errors": format_errors}


def test_advice_threshold_is_ninety_percent_of_all_samples():
    forced = EvalSettings(grader="math-verify")
    # 9 of 10 samples without </think>: the line, naming only the flag that fits this grader.
    line = eval_advice({"a": _result(10, 9, 9)}, forced)
    assert line is not None and "90% of samples never write </think>" in line and line.endswith("--no-force-think.")
    # 8 of 10: a few bad samples, no line. Counted over benchmarks together: (9 + 8) / 20 = 85%.
    assert eval_advice({"a": _result(10, 8, 8)}, forced) is None
    assert eval_advice({"a": _result(10, 9, 9), "b": _result(10, 8, 8)}, forced) is None
    # Nothing required </think> (no forced think, math-verify): missing it is no cause, only missing answers are.
    free = EvalSettings(force_think=False, grader="math-verify")
    assert eval_advice({"a": _result(10, 10, 0)}, free) is None
    assert "95% of samples give no answer" in eval_advice({"a": _result(20, 20, 19)}, free)


def test_unboxed_grader_reads_the_final_text_of_a_model_that_never_boxes():
    from redi.evaluation.grading import grade_many

    # SmolLM2-135M-Instruct's own greedy answers to two word problems (one right, one wrong).
    responses = ["Anna has 5 books and 8 more, so she has a total of 5 + 8 = 13 books.",
                 "Tom has 10 - 5 = 7 pencils left.", "The answer is \\boxed{4}. Or 5."]
    golds = ["13", "5", "4"]
    boxed = grade_many(responses, golds, workers=0, grader="math-verify")
    assert [(v.correct, v.format_error) for v in boxed] == [(False, True), (False, True), (True, False)]
    unboxed = grade_many(responses, golds, workers=0, grader="math-verify-unboxed")
    # The last number is the answer; a boxed one still wins over the text after it.
    assert [(v.correct, v.format_error, v.extracted) for v in unboxed] == [
        (True, False, "13"), (False, False, "7"), (True, False, "4")]
