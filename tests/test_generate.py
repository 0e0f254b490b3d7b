"""`redi data generate` without an engine: known responses through the labelling and output path, the report's
counts, the pairs `redi data pair` makes from the file, resume bookkeeping and the prompt."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from redi.errors import UserError
from redi.pairing.generate import (OPENR1_INSTRUCTION, Completion, GenerateSettings, append_rows, build_report,
                                   label_problems, load_problems, read_done, render_prompt)

# Completions as the engine returns them: the text after the forced "<think>\n" opener.
def _completion(text: str, tokens: int, finish_reason: str) -> Completion:
    return Completion(list(range(tokens)), text, finish_reason)


RIGHT = _completion("7+8 is 15.\n</think>\nSo \\boxed{15}", 12, "stop")
WRONG = _completion("7+8 is 14.\n</think>\nSo \\boxed{14}", 12, "stop")
TRUNCATED_RIGHT = _completion("7+8 is 15.\n</think>\nSo \\boxed{15}", 40, "length")  # boxed right, but cut
UNCLOSED = _completion("7+8 is 15, so \\boxed{15}", 9, "stop")  # the think block never closed
NO_BOX = _completion("hmm\n</think>\nfifteen", 5, "stop")

PROBLEMS = [
    {"id": "mixed", "problem": "7+8=?", "answer": "15"},
    {"id": "all-right", "problem": "8+7=?", "answer": "15"},
    {"id": "all-wrong", "problem": "9+6=?", "answer": "15"},
    {"id": "right-last", "problem": "6+9=?", "answer": 15},
]
TRACES = [
    [WRONG, TRUNCATED_RIGHT, RIGHT, UNCLOSED],
    [RIGHT, RIGHT, RIGHT, RIGHT],
    [WRONG, UNCLOSED, NO_BOX, TRUNCATED_RIGHT],
    [NO_BOX, WRONG, WRONG, RIGHT],
]
VERDICTS = [
    ["wrong", "truncated", "correct", "format_error"],
    ["correct"] * 4,
    ["wrong", "format_error", "format_error", "truncated"],
    ["format_error", "wrong", "wrong", "correct"],
]


@pytest.fixture(scope="module")
def labelled():
    return label_problems(PROBLEMS, TRACES, GenerateSettings(samples=4, workers=0))


def test_verdicts_and_recorded_fields(labelled):
    assert [row["verdicts"] for row in labelled] == VERDICTS
    assert [row["correct"] for row in labelled] == [[v == "correct" for v in vs] for vs in VERDICTS]
    first = labelled[0]
    assert first["generations"][0] == "<think>\n" + WRONG.text  # the forced opener is part of the trace
    assert first["extracted_answers"] == ["14", "15", "15", None]  # truncated: still recorded, never correct
    assert first["finish_reasons"] == ["stop", "length", "stop", "stop"]
    assert first["num_tokens"] == [12, 40, 12, 9]
    assert [row["problem_id"] for row in labelled] == ["mixed", "all-right", "all-wrong", "right-last"]


def test_rllm_grader_gives_the_same_verdicts_here():
    # Plain integers: rllm's reward and math-verify agree; what differs is covered by the grader's own tests.
    rows = label_problems(PROBLEMS, TRACES, GenerateSettings(samples=4, workers=0, grader="rllm"))
    assert [row["verdicts"] for row in rows] == VERDICTS


def test_no_forced_think_grades_plain_answers():
    # Without forcing, a trace with no think block at all is graded on its text; an opened, unclosed one is not.
    plain = [_completion("\n7+8+0=15>5\nc=1>15\n\\boxed{15}", 20, "stop"),
             _completion("<think>\n\\boxed{15}", 5, "stop")]
    row = label_problems(PROBLEMS[:1], [plain], GenerateSettings(samples=2, force_think=False, workers=0))[0]
    assert row["verdicts"] == ["correct", "format_error"]
    assert row["generations"][0] == plain[0].text


def test_report_counts(labelled):
    report = build_report(labelled, 4)
    assert report["problems"] == 4 and report["traces"] == 16
    assert report["verdicts"] == {"correct": 6, "wrong": 4, "truncated": 2, "format_error": 4, "timeout": 0}
    assert report["correct_per_problem"] == {"0": 1, "1..3": 2, "4": 1}
    assert report["correct_per_problem_histogram"] == {"0": 1, "1": 2, "2": 0, "3": 0, "4": 1}
    assert report["pairable_problems"] == 2 and report["sft_problems"] == 3
    assert report["tokens_generated"] == 12 * 10 + 40 * 2 + 9 * 2 + 5 * 2  # 6 right + 4 wrong at 12
    assert report["truncation_rate"] == pytest.approx(2 / 16)
    # With only the first k samples: k=1 pairs nothing; "mixed" pairs from k=3 (wrong, truncated, right) and
    # "right-last" only at k=4.
    assert {k: v["pairable_first_k"] for k, v in report["pairable_by_samples"].items()} == \
        {"1": 0, "2": 0, "3": 1, "4": 2}
    # Expected over random k-subsets: each pairable problem has c=1 correct of 4, so a k-subset misses a pair
    # when it is all wrong (C(3,k) ways) or all right (C(1,k) ways): 0, 1/2, 3/4, 1 for k = 1..4.
    for k, per_problem in zip(range(1, 5), (0.0, 0.5, 0.75, 1.0)):
        expected = 2 * (1 - (math.comb(3, k) + math.comb(1, k)) / math.comb(4, k))
        assert expected == pytest.approx(2 * per_problem)
        assert report["pairable_by_samples"][str(k)]["pairable_expected"] == pytest.approx(expected, abs=1e-3)


def test_redi_data_pair_reads_the_file_as_is(labelled, tmp_path):
    from redi.pairing.pipeline import PairOptions, pair_dataset

    traces = tmp_path / "traces.jsonl"
    append_rows(traces, labelled[:2])
    append_rows(traces, labelled[2:])
    result = pair_dataset(str(traces), tmp_path / "paired", PairOptions(output_format="jsonl", shuffle_seed=None))
    assert result.report["schema"] == "flat"
    pairs = [json.loads(x) for x in (tmp_path / "paired" / "pairs.jsonl").read_text().splitlines()]
    sft = [json.loads(x) for x in (tmp_path / "paired" / "sft.jsonl").read_text().splitlines()]
    # Pairs: the problems with a correct and a not-correct trace; (first correct, first not-correct).
    assert [(p["problem_id"], p["chosen_index"], p["rejected_index"]) for p in pairs] == \
        [("mixed", 2, 0), ("right-last", 3, 0)]
    assert pairs[0]["chosen"][0]["content"] == "<think>\n" + RIGHT.text
    assert pairs[0]["rejected"][0]["content"] == "<think>\n" + WRONG.text
    assert pairs[0]["prompt"] == [{"role": "user", "content": "7+8=?"}]
    assert [(r["problem_id"], r["generation_index"]) for r in sft] == [("mixed", 2), ("all-right", 0),
                                                                      ("right-last", 3)]


def test_resume_bookkeeping_cuts_a_torn_line(labelled, tmp_path):
    traces = tmp_path / "traces.jsonl"
    append_rows(traces, labelled[:2])
    whole = traces.read_bytes()
    with traces.open("ab") as fh:
        fh.write(json.dumps(labelled[2]).encode()[:50])  # a kill mid-write
    assert list(read_done(traces)) == ["mixed", "all-right"]
    assert traces.read_bytes() == whole
    append_rows(traces, labelled[:1])
    with pytest.raises(UserError, match=r"traces.jsonl:3: problem 'mixed' appears twice"):
        read_done(traces)


def test_problems_loader_ids(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps({"problem": f"{i}+1=?", "answer": str(i + 1), "key": f"k{i % 2}"}) + "\n"
                            for i in range(3)))
    assert [p["id"] for p in load_problems(str(path))] == [0, 1, 2]
    with pytest.raises(UserError, match=r"row 3: id 'k0' repeats row 1"):
        load_problems(str(path), id_field="key")
    with pytest.raises(UserError, match=r"row 1: no id in field 'uuid'"):
        load_problems(str(path), id_field="uuid")


def test_prompt_defaults_follow_openr1(tiny_tokenizer):
    text = render_prompt(tiny_tokenizer, "What is 1+1?", GenerateSettings())
    user = OPENR1_INSTRUCTION.replace("{problem}", "What is 1+1?")
    assert user.startswith("You will be given a problem. Please reason step by step, and put your final answer "
                           "within \\boxed{}:\n")
    # No system turn; the assistant turn opens with <think> (rllm's form: no newline before it).
    assert text == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant<think>\n"
    raw = render_prompt(tiny_tokenizer, "457+68=?", GenerateSettings(instruction="{problem}", chat_template=False,
                                                                     force_think=False))
    assert raw == "457+68=?"
    with pytest.raises(UserError, match=r"\{problem\}"):
        GenerateSettings(instruction="no placeholder").check()


def test_a_template_that_opens_think_itself_is_not_given_a_second_one(tiny_model_dir):
    from transformers import AutoTokenizer

    from redi.tiny import CHATML_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # As DeepSeek-R1-Distill's current templates do: the generation prompt ends with "<think>\n".
    tokenizer.chat_template = CHATML_TEMPLATE.replace("assistant\n{% endif %}", "assistant\n<think>\n{% endif %}")
    text = render_prompt(tokenizer, "1+1?", GenerateSettings(instruction="{problem}"))
    assert text.endswith("<|im_start|>assistant\n<think>\n") and text.count("<think>") == 1
