"""`redi data pair` (issue 3): every rule of spec §4 on hand-built rows, each with its expected outcome.

Fixtures (tests/fixtures/pair_*): ``pair_openr1_raw.jsonl`` (row numbers count non-blank lines, the non-JSON
line included, as ``datasets`` would number a clean file), ``pair_openr1_220k.jsonl``, ``pair_flat.jsonl``,
``pair_benchmark.json`` (for decontamination).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from redi.errors import UserError
from redi.pairing.pipeline import PairOptions, pair_dataset

FIXTURES = Path(__file__).parent / "fixtures"
RAW = FIXTURES / "pair_openr1_raw.jsonl"
K220 = FIXTURES / "pair_openr1_220k.jsonl"
FLAT = FIXTURES / "pair_flat.jsonl"
BENCH = FIXTURES / "pair_benchmark.json"


def run(tmp_path, source=RAW, name="out", **options):
    options.setdefault("shuffle_seed", None)  # input order keeps the expectations readable
    options.setdefault("workers", 0)
    result = pair_dataset(str(source), tmp_path / name, PairOptions(**options))
    return result.report, outputs(tmp_path / name)


def outputs(folder: Path) -> tuple[dict, dict]:
    """{problem_id: [SFT generation indices]}, {problem_id: [(chosen, rejected)]}, checking the row contents."""
    import pyarrow.parquet as pq

    sft: dict = {}
    for row in pq.read_table(folder / "sft.parquet").to_pylist():
        assert row["prompt"][0]["role"] == "user" and len(row["prompt"]) == 1
        assert row["completion"][0]["role"] == "assistant" and len(row["completion"]) == 1
        sft.setdefault(row["problem_id"], []).append(row["generation_index"])
    pairs: dict = {}
    for row in pq.read_table(folder / "pairs.parquet").to_pylist():
        roles = [m["role"] for m in row["prompt"] + row["chosen"] + row["rejected"]]
        assert roles == ["user", "assistant", "assistant"]
        pairs.setdefault(row["problem_id"], []).append((row["chosen_index"], row["rejected_index"]))
    return sft, pairs


# --------------------------------------------------------------------------------------------- the paper


def test_default_rules_reproduce_the_paper(tmp_path):
    report, (sft, pairs) = run(tmp_path)
    # r00: g0 math-verify-only and g1 llama-only are NOT correct; g2 (both) is the positive; rejected = g0.
    # r01: " Yes " is valid; g1's null llama label is false. r04: the re-parsed label decides, not the raw one.
    # r12: first correct (g0) vs first not-correct (g1). r13: no validity key, no check. row-17: no id field.
    assert sft == {"r00": [2], "r01": [0], "r04": [1], "r06": [0], "r12": [0], "r13": [0], "r15": [0],
                   "row-17": [1]}
    assert pairs == {"r00": [(2, 0)], "r01": [(0, 1)], "r04": [(1, 0)], "r12": [(0, 1)], "r13": [(0, 1)],
                     "r15": [(0, 1)], "row-17": [(1, 0)]}
    assert report["rows_read"] == 18  # the whitespace-only line is not a row; the non-JSON line is
    assert report["rows_dropped"] == {"malformed": 6, "invalid": 2, "excluded_source": 1, "contaminated": 0,
                                      "no_correct_trace": 1}
    assert report["rows_without_pair"] == {"no_incorrect_trace": 1, "too_long": 0}  # r06: all correct
    assert (report["sft_problems"], report["sft_rows"], report["pairs"]) == (8, 8, 7)
    assert report["null_labels"] == 1
    malformed = {entry["row"]: entry for entry in report["malformed"]}
    assert sorted(malformed) == [8, 9, 10, 11, 12, 17]  # 1-based, as `redi train` counts rows
    assert malformed[8]["id"] == "r07" and "1 labels for 2 generations" in malformed[8]["reason"]
    assert malformed[9]["reason"] == "empty generations"
    assert malformed[10]["reason"].startswith("line 10: not JSON")
    assert malformed[11]["reason"] == "missing field generations"
    assert malformed[12]["reason"] == "missing field correctness"
    assert "str label" in malformed[17]["reason"]


def test_trace_texts_and_prompt_are_the_rows_own(tmp_path):
    import pyarrow.parquet as pq

    run(tmp_path)
    pair = [r for r in pq.read_table(tmp_path / "out" / "pairs.parquet").to_pylist() if r["problem_id"] == "r00"][0]
    assert pair["prompt"] == [{"role": "user", "content": "Find x if x + 1 = 3."}]
    assert pair["chosen"] == [{"role": "assistant", "content": "r00 g2 both"}]
    assert pair["rejected"] == [{"role": "assistant", "content": "r00 g0 verify-only"}]
    assert pair["source"] == "olympiads"


@pytest.mark.parametrize("rule, sft, pairs", [
    ("any", {"r00": [0], "r01": [0], "r04": [0], "r05": [1], "r06": [0], "r12": [0], "r13": [0], "r15": [0],
             "row-17": [1]},
     {"r05": [(1, 0)], "r12": [(0, 3)], "r13": [(0, 1)], "r15": [(0, 1)], "row-17": [(1, 0)]}),
    ("math-verify", {"r00": [0], "r01": [0], "r04": [1], "r06": [0], "r07": [0], "r12": [0], "r13": [0],
                     "r15": [0], "r16": [0], "row-17": [1]},
     {"r00": [(0, 1)], "r04": [(1, 0)], "r12": [(0, 3)], "r13": [(0, 1)], "r15": [(0, 1)], "row-17": [(1, 0)]}),
    ("llama", {"r00": [1], "r01": [0], "r04": [0], "r05": [1], "r06": [0], "r12": [0], "r13": [0], "r15": [0],
               "row-17": [1]},
     {"r00": [(1, 0)], "r01": [(0, 1)], "r05": [(1, 0)], "r12": [(0, 1)], "r13": [(0, 1)], "r15": [(0, 1)],
      "row-17": [(1, 0)]}),
])
def test_correct_if_variants(tmp_path, rule, sft, pairs):
    report, (got_sft, got_pairs) = run(tmp_path, correct_if=rule)
    assert got_sft == sft
    assert got_pairs == pairs
    # Only the labels a rule reads can make a row malformed: r07's short llama list, r16's string llama label.
    expected_malformed = [9, 10, 11, 12] if rule == "math-verify" else [8, 9, 10, 11, 12, 17]
    assert [m["row"] for m in report["malformed"]] == expected_malformed


def test_pairs_per_problem_and_all_positives(tmp_path):
    _, (sft, pairs) = run(tmp_path, name="two", pairs_per_problem=2, all_positives=True)
    assert sft["r12"] == [0, 2] and sft["r06"] == [0, 1] and sft["r00"] == [2]
    assert pairs["r12"] == [(0, 1), (0, 3)]  # chosen-major combinations
    _, (_, every) = run(tmp_path, name="all", pairs_per_problem=0)
    assert every["r12"] == [(0, 1), (0, 3), (2, 1), (2, 3)]
    assert every["r00"] == [(2, 0), (2, 1)]


def test_decontamination_removes_and_reports(tmp_path):
    report, (sft, pairs) = run(tmp_path, decontaminate=(str(BENCH),))
    assert "r15" not in sft and "r15" not in pairs
    assert "r06" in sft  # shares fewer than 8 words with the second benchmark problem
    assert report["rows_dropped"]["contaminated"] == 1
    [entry] = report["contaminated"]
    assert entry["row"] == 16 and entry["id"] == "r15" and entry["benchmark"] == str(BENCH)
    assert entry["ngram"] == "ab = 13, bc = 14 and ca"  # lower-cased, whitespace-normalised word 8-gram
    assert report["contaminated_per_benchmark"] == {str(BENCH): 1}


# ------------------------------------------------------------------------------------------ other schemas


def test_openr1_220k_schema(tmp_path):
    report, (sft, pairs) = run(tmp_path, source=K220)
    assert report["schema"] == "openr1-220k"
    # k0: correctness_llama null (judge not run) -> all labels null -> nothing correct under "both".
    # k2: the truncated trace (is_reasoning_complete false) is never the positive, but may be the rejected.
    assert sft == {"k1": [1], "k2": [1]}
    assert pairs == {"k1": [(1, 0)], "k2": [(1, 0)]}
    assert report["rows_dropped"] == {"malformed": 1, "invalid": 0, "excluded_source": 1, "contaminated": 0,
                                      "no_correct_trace": 1}
    assert report["null_labels"] == 2
    _, (sft_any, _) = run(tmp_path, source=K220, name="any", correct_if="any", require_complete=False)
    assert sft_any == {"k0": [0], "k1": [0], "k2": [0]}


def test_flat_schema_flags_and_math_verify_grading(tmp_path):
    report, (sft, pairs) = run(tmp_path, source=FLAT)
    assert report["schema"] == "flat"
    # f1, f2 have no flags: graded against `answer` (boxed 3 vs 2 is wrong; a missing box is a format error).
    assert sft == {"f0": [1], "f1": [1], "f2": [1], "f4": [1]}
    assert pairs == {"f0": [(1, 0)], "f1": [(1, 0)], "f2": [(1, 0)], "f4": [(1, 0)]}
    assert report["graded"] == {"generations": 4, "format_errors": 1, "timeouts": 0}
    assert [m["id"] for m in report["malformed"]] == ["f3"]
    assert "missing field answer" in report["malformed"][0]["reason"]
    # Through worker processes, the unlabelled rows travel back to be graded; the result is the same bytes.
    run(tmp_path, source=FLAT, name="pool", workers=2)
    for name in ("sft.parquet", "pairs.parquet", "report.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "pool" / name).read_bytes()


# --------------------------------------------------------------------------------------- order, determinism


def _clean_rows(n: int, seed: int = 3) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.choice([1, 2, 2, 4])
        rows.append({"uuid": f"u{i}", "problem": f"problem {i}", "answer": "1",
                     "source": rng.choice(["olympiads", "cn_k12", "amc_aime"]),
                     "problem_is_valid": rng.choice(["Yes", "No"]), "generations": [f"u{i} g{j}" for j in range(k)],
                     "correctness": {"llama_verification": [rng.random() < 0.7 for _ in range(k)],
                                     "math_verify_answer": [True] * k,
                                     "math_verify_reparsed_answer": [rng.random() < 0.6 for _ in range(k)]}})
    return rows


def test_seed_42_order_matches_the_authors_datasets_shuffle(tmp_path):
    import datasets
    import pyarrow.parquet as pq

    rows = _clean_rows(150)
    path = tmp_path / "clean.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pair_dataset(str(path), tmp_path / "out", PairOptions(workers=0))  # default: shuffle_seed=42
    # The authors' scripts (R clean_base_shuffled*.py): shuffle(seed=42) first, then first-true / first-false.
    expected_sft, expected_pairs = [], []
    for item in datasets.Dataset.from_list(rows).shuffle(seed=42):
        if item["problem_is_valid"].strip().lower() != "yes" or item["source"] == "cn_k12":
            continue
        c = item["correctness"]
        ok = [bool(a) and bool(b) for a, b in zip(c["llama_verification"], c["math_verify_reparsed_answer"])]
        if True in ok:
            expected_sft.append((item["uuid"], ok.index(True)))
            if False in ok:
                expected_pairs.append((item["uuid"], ok.index(True), ok.index(False)))
    sft = pq.read_table(tmp_path / "out" / "sft.parquet").to_pylist()
    pairs = pq.read_table(tmp_path / "out" / "pairs.parquet").to_pylist()
    assert [(r["problem_id"], r["generation_index"]) for r in sft] == expected_sft
    assert [(r["problem_id"], r["chosen_index"], r["rejected_index"]) for r in pairs] == expected_pairs
    assert len(expected_pairs) > 10


def test_reruns_and_worker_processes_give_identical_bytes(tmp_path, monkeypatch):
    import redi.pairing.decode as decode

    rows = _clean_rows(400, seed=5)
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n  \n")
    monkeypatch.setattr(decode, "RANGE_BYTES", 2048)  # many byte ranges: lines cut at range edges
    opts = dict(all_positives=True, pairs_per_problem=0)
    pair_dataset(str(path), tmp_path / "a", PairOptions(workers=0, **opts))
    pair_dataset(str(path), tmp_path / "b", PairOptions(workers=0, **opts))
    pair_dataset(str(path), tmp_path / "c", PairOptions(workers=2, **opts))
    for name in ("sft.parquet", "pairs.parquet", "report.json"):
        first = (tmp_path / "a" / name).read_bytes()
        assert first == (tmp_path / "b" / name).read_bytes(), name
        assert first == (tmp_path / "c" / name).read_bytes(), name
    assert json.loads((tmp_path / "a" / "report.json").read_text())["rows_read"] == 400


def test_count_lines_skips_blank_lines_like_the_reader():
    from redi.pairing.decode import JsonlBlock, count_lines, decode_task

    for block in (b"", b"{}\n", b"{}", b"\n{}\n \n\r\n{}", b"  \n{}\r\n\t\n{}\n", b"{}\n\n\n", b" "):
        rows = decode_task(JsonlBlock(block, 0, 1, ""), None)
        assert count_lines(block)[0] == len(rows), block


# ------------------------------------------------------------------------------------------- formats, I/O


def test_output_loads_with_datasets_and_jsonl_format(tmp_path):
    import datasets

    run(tmp_path)
    sft = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "sft.parquet"), split="train")
    pairs = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "pairs.parquet"), split="train")
    assert sft.column_names == ["prompt", "completion", "problem_id", "source", "generation_index"]
    assert pairs.column_names == ["prompt", "chosen", "rejected", "problem_id", "source", "chosen_index",
                                  "rejected_index"]
    assert len(sft) == 8 and len(pairs) == 7
    assert pairs[0]["prompt"] == [{"role": "user", "content": "Find x if x + 1 = 3."}]

    # Same folder in jsonl: the parquet files go (redi train would prefer them), the rows are the same.
    out = tmp_path / "out"
    pair_dataset(str(RAW), out, PairOptions(shuffle_seed=None, workers=0, output_format="jsonl"), force=True)
    assert not (out / "sft.parquet").exists() and not (out / "pairs.parquet").exists()
    lines = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert [(r["problem_id"], r["chosen_index"], r["rejected_index"]) for r in lines][:2] == [("r00", 2, 0),
                                                                                            ("r01", 0, 1)]
    assert list(lines[0]) == ["prompt", "chosen", "rejected", "problem_id", "source", "chosen_index",
                              "rejected_index"]


def test_gzipped_jsonl_matches_plain(tmp_path):
    import gzip

    gz = tmp_path / "raw.jsonl.gz"
    gz.write_bytes(gzip.compress(RAW.read_bytes()))
    report, _ = run(tmp_path, source=gz, name="gz", shuffle_seed=42)
    run(tmp_path, source=RAW, name="plain", shuffle_seed=42)
    assert report["rows_read"] == 18 and report["malformed"][2]["reason"].startswith("line 10: not JSON")
    for name in ("sft.parquet", "pairs.parquet"):
        assert (tmp_path / "gz" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


def test_parquet_and_save_to_disk_inputs_match_jsonl(tmp_path):
    import datasets

    rows = _clean_rows(60, seed=9)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = datasets.Dataset.from_list(rows)
    dataset.to_parquet(str(tmp_path / "in.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    run(tmp_path, source=path, name="j", shuffle_seed=42)
    run(tmp_path, source=tmp_path / "in.parquet", name="p", shuffle_seed=42)
    run(tmp_path, source=tmp_path / "saved", name="s", shuffle_seed=42)
    for name in ("sft.parquet", "pairs.parquet"):
        assert (tmp_path / "j" / name).read_bytes() == (tmp_path / "p" / name).read_bytes()
        assert (tmp_path / "j" / name).read_bytes() == (tmp_path / "s" / name).read_bytes()


# -------------------------------------------------------------------------------------------- length filter


CHATML_WITH_SYSTEM = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nReason step by step.<|im_end|>\\n' }}"
    "{%- endif %}{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A word-level tokenizer with a Qwen-like template (system block injected), built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML_WITH_SYSTEM
    folder = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(folder)
    return str(folder)


def test_length_filter_measures_with_the_chat_template(tmp_path, word_tokenizer, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    long_text = " ".join(["word"] * 60)
    rows = [
        {"id": "ok", "problem": "short problem", "answer": "1", "generations": ["good answer", "bad answer"],
         "correct": [True, False]},
        {"id": "long-rejected", "problem": "short problem", "answer": "1", "generations": ["good", long_text],
         "correct": [True, False]},
        {"id": "long-prompt", "problem": long_text, "answer": "1", "generations": ["good", "bad"],
         "correct": [True, False]},
    ]
    path = tmp_path / "flat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = AutoTokenizer.from_pretrained(word_tokenizer)

    def tokens(messages) -> int:  # the authors' measure: template tokens + 1
        ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=False, return_dict=False)
        return len(ids) + 1

    response_limit = tokens([{"role": "assistant", "content": long_text}]) - 1
    prompt_limit = tokens([{"role": "user", "content": long_text}]) - 1
    report, (sft, pairs) = run(tmp_path, source=path, tokenizer=word_tokenizer, max_prompt_tokens=prompt_limit,
                               max_response_tokens=response_limit)
    assert pairs == {"ok": [(0, 1)]}
    assert sft == {"ok": [0], "long-rejected": [0], "long-prompt": [0]}  # the paper filters pairs only
    assert report["pairs_dropped_too_long"] == 2 and report["rows_without_pair"]["too_long"] == 2
    hist = report["length_histograms"]
    assert hist["pair_chosen"]["unit"] == "tokens"
    assert hist["pair_chosen"]["max"] == tokens([{"role": "assistant", "content": "good answer"}])
    assert hist["pair_prompt"]["max"] == tokens([{"role": "user", "content": "short problem"}])
    # One more token of headroom and both pairs fit.
    report, _ = run(tmp_path, source=path, name="roomy", tokenizer=word_tokenizer,
                    max_prompt_tokens=prompt_limit + 1, max_response_tokens=response_limit + 1)
    assert report["pairs"] == 3


# --------------------------------------------------------------------------------------------------- the CLI


def cli(*args) -> int:
    from redi.cli.main import main

    return main(["data", "pair", *map(str, args)])


def test_cli_writes_the_folder_and_prints_the_table(tmp_path, capsys):
    assert cli(RAW, "--output", tmp_path / "out", "--shuffle-seed", "none", "--workers", "0") == 0
    out = capsys.readouterr().out
    assert "rows read" in out and "pairs" in out and "malformed row 10: line 10: not JSON" in out
    assert json.loads((tmp_path / "out" / "report.json").read_text())["pairs"] == 7
    # --exclude-source replaces the default list; 'none' keeps every source (r03 is cn_k12).
    assert cli(RAW, "-o", tmp_path / "all", "--exclude-source", "none", "--workers", "0") == 0
    assert json.loads((tmp_path / "all" / "report.json").read_text())["rows_dropped"]["excluded_source"] == 0
    assert cli(RAW, "-o", tmp_path / "two", "--exclude-source", "olympiads", "--exclude-source", "cn_k12",
               "--workers", "0") == 0
    assert json.loads((tmp_path / "two" / "report.json").read_text())["rows_dropped"]["excluded_source"] == 12


@pytest.mark.parametrize("args, message", [
    (["missing.jsonl"], "error: input not found: missing.jsonl"),
    ([RAW, "--schema", "nope"], "error: unknown --schema 'nope'"),
    ([RAW, "--correct-if", "maybe"], "error: unknown --correct-if 'maybe'"),
    ([FLAT, "--correct-if", "any"], "error: --correct-if applies to openr1-raw and openr1-220k"),
    ([RAW, "--format", "csv"], "error: unknown --format 'csv'"),
    ([RAW, "--shuffle-seed", "x"], "error: --shuffle-seed 'x'"),
    ([RAW, "--pairs-per-problem", "-1"], "error: --pairs-per-problem must be >= 0"),
    ([RAW, "--decontaminate", "nowhere.json"], "error: --decontaminate file not found: nowhere.json"),
    ([RAW, "--tokenizer", "/nonexistent/tok"], "error: cannot load a tokenizer from /nonexistent/tok"),
    ([BENCH], "error: cannot tell the schema of"),
])
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli(*args, "--output", tmp_path / "out", "--workers", "0") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message), err
    assert "\n" not in err and "Traceback" not in err


def test_python_api_raises_user_error_for_a_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"problem": ["p"], "correctness": [{"llama_verification": [True]}]}),
                   tmp_path / "x.parquet")
    with pytest.raises(UserError, match="no column 'generations'"):
        pair_dataset(str(tmp_path / "x.parquet"), tmp_path / "out", PairOptions(workers=0))


# ------------------------------------------------------------------------------- issue 22: bad input, bounds


def test_force_never_replaces_an_input_file(tmp_path, capsys):
    """Issue 22 §2.1: `data pair F/pairs.jsonl -o F --force` once replaced 50 teacher rows with 20 pairs."""
    folder = tmp_path / "F"
    folder.mkdir()
    data = folder / "pairs.jsonl"
    data.write_bytes(RAW.read_bytes())
    # The file by another spelling of its path, and the folder that holds it.
    for source in (tmp_path / "F" / ".." / "F" / "pairs.jsonl", folder):
        code = cli(source, "-o", folder, "--force", "--format", "jsonl", "--workers", "0")
        err = capsys.readouterr().err.strip()
        assert code == 2 and "would replace the input file" in err and "\n" not in err, err
        assert data.read_bytes() == RAW.read_bytes()
        assert sorted(p.name for p in folder.iterdir()) == ["pairs.jsonl"]


def _enumerated_pairs(correct: list[bool], pairs_per_problem: int) -> list[tuple[int, int]]:
    """The rule as first written: every chosen-major (correct, not-correct) combination, then the first N."""
    good = [i for i, ok in enumerate(correct) if ok]
    bad = [i for i, ok in enumerate(correct) if not ok]
    pairs = [(c, r) for c in good for r in bad] if good else []
    return pairs[:pairs_per_problem] if pairs_per_problem > 0 else pairs


def test_select_matches_the_enumeration_and_does_not_build_it():
    """Issue 22 §4: 10,000 traces of one problem built 25M combinations (1.87 GB) to keep one."""
    import tracemalloc

    from redi.pairing.rules import select

    rng = random.Random(0)
    for _ in range(300):
        correct = [rng.random() < rng.random() for _ in range(rng.randrange(0, 12))]
        for n in (0, 1, 2, 3, 7, 100):
            assert select(correct, pairs_per_problem=n)[1] == _enumerated_pairs(correct, n)
    many = [i % 2 == 0 for i in range(3000)]  # 1,500 x 1,500 = 2.25M combinations if enumerated
    tracemalloc.start()
    try:
        sft, pairs = select(many, pairs_per_problem=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sft == [0] and pairs == [(0, 1), (0, 3)]
    assert peak < 2 << 20, f"select allocated {peak / 2**20:.0f} MiB for 2 pairs"
