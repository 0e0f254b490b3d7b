"""`redi data pair --ablation verifier-signal` (issue 24) on a hand-built OpenR1-Math-Raw fixture whose split is
worked out by hand below, and against the authors' script (Tim-Siu/reinforcement-distillation
experiments_trl/data_preprocess/ablation_verifier_signal.py at dda07d2; line numbers below are that file's)."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from redi.pairing.ablation import verifier_signal
from redi.pairing.pipeline import PairOptions

C, W, H = "right \\boxed{1}", "wrong \\boxed{2}", "judges disagree \\boxed{3}"  # each under 30 characters
LONG = "x" * 60  # a correct trace of 60 characters: 61 tokens with the tiny char-level tokenizer (+1 for EOS)


def raw(pid, gens, llama, mv, **extra):
    row = {"uuid": pid, "problem": f"problem {pid}", "generations": gens, "problem_is_valid": "yes",
           "source": "olympiads", "correctness": {"llama_verification": llama, "math_verify_reparsed_answer": mv}}
    return {**row, **extra}


T, F = True, False
ROWS = [
    raw("x-invalid", [C, W], [T, F], [T, F], problem_is_valid="No"),
    raw("x-cnk12", [C, W], [T, F], [T, F], source="cn_k12"),
    raw("x-malformed", [C, W], [T], [T, F]),
    raw("a1", [C, W], [T, F], [T, F]),
    raw("a2", [H, W, C], [T, F, T], [F, F, T]),  # g0 one-verifier: neither; strict incorrect g1; correct g2
    raw("a3", [C, W], [T, None], [T, F]),  # a null label is false: g1 is both-false
    raw("a4", [W, C], [F, T], [F, T]),
    raw("a5", [LONG, W], [T, F], [T, F]),  # its pair is over the length limit, whichever group it is in
    raw("a6", [C, W], [T, F], [T, F]),
    raw("a7", [W, C], [F, T], [F, T]),
    raw("a8", [C, W, W], [T, F, F], [T, F, F]),
    raw("b1", [C], [T], [T]),
    raw("b2", [C, H], [T, T], [T, F]),  # the main pipeline would pair these; here g1 is neither: Type B
    raw("b3", [H, C], [F, T], [T, T]),
    raw("n1", [W], [F], [F]),  # no correct trace
    raw("n2", [H], [T], [F]),  # no correct trace (one verifier only)
]
TYPE_A = ["a1", "a2", "a3", "a4", "a5", "a6", "a7", "a8"]

# The hand count (input order, --shuffle-seed none):
#   16 rows read; dropped: 1 invalid (x-invalid), 1 excluded source (x-cnk12), 1 malformed (x-malformed: one
#   llama label for two traces), 2 without a correct trace (n1, n2).
#   Type A (a correct AND a both-false trace): a1..a8 = 8. Type B (correct, no both-false trace): b1, b2, b3 = 3;
#   b2 and b3 hold one-verifier traces, which the stricter rule counts as neither correct nor incorrect.
#   G1 = 8 // 2 = 4, G2 = 4. Mixed SFT = 4 (G1 correct) + 4 (G2 incorrect) + 3 (Type B correct) = 11 rows.
#   Length filter at 40 tokens: every trace is under 30 characters except a5's correct one (61 tokens), so a5's
#   pair goes whether a5 is in G1 (main: chosen too long) or G2 (inverted: rejected too long): the groups give
#   4 and 3 pairs, and balancing cuts the 4 to 3. Main = 3 pairs, inverted = 3 pairs.
HAND = {"rows_read": 16, "invalid": 1, "excluded_source": 1, "malformed": 1, "no_correct_trace": 2, "type_a": 8,
        "type_b": 3, "group1": 4, "group2": 4, "sft_rows": 11, "main": 3, "inverted": 3}
# Trace indices (correct, strict incorrect) per Type A problem, by hand from the labels above.
INDICES = {"a1": (0, 1), "a2": (2, 1), "a3": (0, 1), "a4": (1, 0), "a5": (0, 1), "a6": (0, 1), "a7": (1, 0),
           "a8": (0, 1)}


def authors_split(type_a_in_order: list[str]) -> tuple[list[str], list[str]]:
    """Lines 244-249, transcribed: random.seed(SPLIT_SEED); random.shuffle(type_a_problems); cut at len // 2."""
    type_a_problems = list(type_a_in_order)
    random.seed(123)
    random.shuffle(type_a_problems)
    split_point = len(type_a_problems) // 2
    return type_a_problems[:split_point], type_a_problems[split_point:]


def authors_balance(main: list, ablation: list) -> tuple[list, list]:
    """Lines 451-464, transcribed: the larger set sampled down with random.seed(SPLIT_SEED) each time."""
    main_count, ablation_count = len(main), len(ablation)
    if main_count != ablation_count:
        min_count = min(main_count, ablation_count)
        if main_count > min_count:
            random.seed(123)
            main = random.sample(main, min_count)
        if ablation_count > min_count:
            random.seed(123)
            ablation = random.sample(ablation, min_count)
    return main, ablation


@pytest.fixture(scope="module")
def fixture_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("raw") / "raw.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def run(tmp_path, fixture_file, tokenizer, name="out", **options):
    opts = PairOptions(shuffle_seed=options.pop("shuffle_seed", None), tokenizer=tokenizer, max_response_tokens=40,
                       output_format="jsonl", workers=0, **options)
    report = verifier_signal(str(fixture_file), tmp_path / name, opts)
    read = {key: [json.loads(x) for x in (tmp_path / name / folder / f"{kind}.jsonl").read_text().splitlines()]
            for key, folder, kind in (("sft", "sft-mixed", "sft"), ("main", "main", "pairs"),
                                       ("inverted", "inverted", "pairs"))}
    return report, read


def test_counts_match_the_hand_count(tmp_path, fixture_file, tiny_model_dir):
    report, sets = run(tmp_path, fixture_file, tiny_model_dir)
    got = {"rows_read": report["rows_read"], **{k: report["rows_dropped"][k] for k in
           ("invalid", "excluded_source", "malformed", "no_correct_trace")},
           "type_a": report["type_a"], "type_b": report["type_b"], "group1": report["group1"],
           "group2": report["group2"], "sft_rows": len(sets["sft"]), "main": len(sets["main"]),
           "inverted": len(sets["inverted"])}
    assert got == HAND
    assert report["main"]["too_long"] + report["inverted"]["too_long"] == 1  # a5's pair, in one group or the other


def test_split_and_sets_follow_the_authors_script(tmp_path, fixture_file, tiny_model_dir):
    report, sets = run(tmp_path, fixture_file, tiny_model_dir)
    g1, g2 = authors_split(TYPE_A)
    # Mixed SFT (lines 254-307): G1's correct traces, then G2's incorrect ones, then Type B's correct ones.
    assert [r["problem_id"] for r in sets["sft"]] == g1 + g2 + ["b1", "b2", "b3"]
    want_index = [INDICES[p][0] for p in g1] + [INDICES[p][1] for p in g2] + [0, 0, 1]
    assert [r["generation_index"] for r in sets["sft"]] == want_index
    assert [r["completion"][0]["content"] for r in sets["sft"]][len(g1):len(g1) + len(g2)] == [W] * len(g2)
    # Pairs (lines 344-444): main = G1 right way round, inverted = G2 with chosen = the incorrect trace; the
    # length filter drops a5; then the balancing sample (lines 451-464).
    main, inverted = authors_balance([p for p in g1 if p != "a5"], [p for p in g2 if p != "a5"])
    assert [r["problem_id"] for r in sets["main"]] == main
    assert [r["problem_id"] for r in sets["inverted"]] == inverted
    for row in sets["main"]:
        assert (row["chosen_index"], row["rejected_index"]) == INDICES[row["problem_id"]]
    for row in sets["inverted"]:
        assert (row["rejected_index"], row["chosen_index"]) == INDICES[row["problem_id"]]
        assert row["rejected"][0]["content"] in (C,) and row["chosen"][0]["content"] == W
    split = [json.loads(x) for x in (tmp_path / "out" / "split.jsonl").read_text().splitlines()]
    assert {r["problem_id"]: r["group"] for r in split} == {**{p: 1 for p in g1}, **{p: 2 for p in g2},
                                                            "b1": None, "b2": None, "b3": None}


def test_seed_42_order_is_the_datasets_shuffle(tmp_path, fixture_file, tiny_model_dir):
    # datasets' shuffle(seed=42) takes rows in np.random.default_rng(42).permutation(N) order; Type A problems
    # meet the seed-123 shuffle in that order.
    order = [ROWS[i]["uuid"] for i in np.random.default_rng(42).permutation(len(ROWS))]
    report, sets = run(tmp_path, fixture_file, tiny_model_dir, shuffle_seed=42)
    g1, g2 = authors_split([p for p in order if p in TYPE_A])
    type_b = [p for p in order if p.startswith("b")]
    assert [r["problem_id"] for r in sets["sft"]] == g1 + g2 + type_b
    assert report["group1"] == 4 and len(sets["main"]) == len(sets["inverted"]) == 3


def test_without_a_tokenizer_no_length_filter(tmp_path, fixture_file):
    report, sets = run(tmp_path, fixture_file, None)
    assert len(sets["main"]) == len(sets["inverted"]) == 4 and report["length_filter"] is None


def test_cli_writes_the_four_sets_and_refuses_other_rules(tmp_path, fixture_file, tiny_model_dir, capsys):
    from redi.cli.main import main

    out = tmp_path / "cli"
    args = ["data", "pair", str(fixture_file), "--ablation", "verifier-signal", "--output", str(out),
            "--tokenizer", tiny_model_dir, "--max-response-tokens", "40", "--workers", "0"]
    assert main(args) == 0
    assert "mixed SFT rows" in capsys.readouterr().out
    for path in ("sft-mixed/sft.parquet", "main/pairs.parquet", "inverted/pairs.parquet", "split.jsonl", "report.json"):
        assert (out / path).is_file(), path
    assert main(args) == 2  # the folder is not empty now: --force needed
    assert "--force" in capsys.readouterr().err
    assert main([*args, "--force", "--correct-if", "any"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --correct-if does not apply to --ablation verifier-signal") and "\n" not in err


def test_flat_rows_are_refused(tmp_path):
    from redi.errors import UserError

    path = tmp_path / "flat.jsonl"
    path.write_text(json.dumps({"problem": "p", "generations": ["a"], "correct": [True]}) + "\n")
    with pytest.raises(UserError, match="needs both verifiers' labels"):
        verifier_signal(str(path), tmp_path / "out", PairOptions(workers=0))


def test_shipped_compare_grid_trains_each_arm_on_its_own_pairs(tmp_path):
    """configs/verifier-signal.yaml on a tiny model: the main arm trains on main/, the inverted arm on inverted/
    (per-arm data), from the one mixed-SFT start."""
    import yaml

    from redi.experiments.compare_report import run_compare
    from redi.tiny import build_model

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    grid = yaml.safe_load((root / "configs" / "verifier-signal.yaml").read_text())
    assert [(a["name"], a["data"]) for a in grid["arms"]] == [("main", "data/verifier-signal/main"),
                                                              ("inverted", "data/verifier-signal/inverted")]
    sizes = {"main": 8, "inverted": 6}  # different sizes, so each arm's data report tells which set it read
    for arm in grid["arms"]:
        folder = tmp_path / arm["name"]
        folder.mkdir()
        rows = [{"prompt": f"{a}+{a}=?", "chosen": str(2 * a), "rejected": str(2 * a + 1)} for a in range(sizes[arm["name"]])]
        (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        arm["data"] = str(folder)
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    bench = tmp_path / "math500.jsonl"
    bench.write_text("".join(json.dumps({"problem": f"{a}+{a}=?", "answer": str(2 * a)}) + "\n" for a in range(3)))
    sft = build_model(tmp_path / "sft-mixed", seed=1)
    sets = [f"sft_checkpoints.sft-mixed.path={sft}", "backend=cpu", "pairs.max_steps=1", "pairs.batch_size=2",
            "pairs.micro_batch_size=2", "pairs.max_length=64", "pairs.max_prompt_length=32", "eval_every=1",
            f"eval.benchmarks=[{bench}]", "eval.samples=1", "eval.max_new_tokens=2", "eval.workers=1", "system_prompt="]
    run_compare(tmp_path / "grid.yaml", tmp_path / "C", sets=sets)
    for name, size in sizes.items():
        run = tmp_path / "C" / "arms" / name / "seed-0"
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["data"] == str(tmp_path / name) and cfg["model"] == str(sft) and cfg["alpha"] == 0.8
        assert json.loads((run / "data_report.json").read_text())["pairs"]["rows"] == size
