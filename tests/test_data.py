"""Row formats, tokenisation, length rules and malformed rows."""
from __future__ import annotations

import json

import numpy as np
import pytest

from redi.training.batching import StepPlan, lr_at
from redi.data import Encoder, load_pairs, load_sft, resolve_sources
from redi.errors import UserError


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_paper_pair_format_equals_trl_explicit_format(tmp_path, tiny_tokenizer):
    user = {"role": "user", "content": "1+2=?"}
    good, bad = {"role": "assistant", "content": "3"}, {"role": "assistant", "content": "4"}
    paper = _write(tmp_path / "a.jsonl", [{"prompt": "1+2=?", "chosen": [user, good], "rejected": [user, bad]}])
    trl = _write(tmp_path / "b.jsonl", [{"prompt": [user], "chosen": [good], "rejected": [bad]}])
    enc = Encoder(tiny_tokenizer)
    (a,), _ = load_pairs(paper, enc, 512)
    (b,), _ = load_pairs(trl, enc, 512)
    for x, y in ((a.chosen, b.chosen), (a.rejected, b.rejected)):
        np.testing.assert_array_equal(x.prompt, y.prompt)
        np.testing.assert_array_equal(x.completion, y.completion)
    assert tiny_tokenizer.decode(a.rejected.completion.tolist()) == "4<|im_end|>\n<|endoftext|>"


def test_plain_string_rows_get_eos_once(tmp_path, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token
    path = _write(tmp_path / "s.jsonl", [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "4" + eos}])
    seqs, report = load_sft(path, Encoder(tiny_tokenizer), 512)
    assert [len(s.completion) for s in seqs] == [2, 2]
    assert report.kept == 2 and report.truncated == 0


def test_messages_rows_mask_everything_before_last_assistant(tmp_path, tiny_tokenizer):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    (seq,), _ = load_sft(_write(tmp_path / "m.jsonl", [{"messages": msgs}]), Encoder(tiny_tokenizer), 512)
    assert tiny_tokenizer.decode(seq.completion.tolist()) == "yo<|im_end|>\n<|endoftext|>"


def test_sft_truncates_and_counts_pairs_drop_and_count(tmp_path, tiny_tokenizer):
    enc = Encoder(tiny_tokenizer)
    long = "9" * 100
    sft, report = load_sft(_write(tmp_path / "s.jsonl", [{"prompt": "q", "completion": long}, {"prompt": "q", "completion": "1"}]), enc, 40)
    assert report.truncated == 1 and max(s.length for s in sft) == 40 and len(sft) == 2
    # L counts exactly the kept tokens: the truncated completion has no EOS any more
    assert len(sft[0].completion) == 40 - len(sft[0].prompt)
    rows = [{"prompt": "q", "chosen": long, "rejected": "1"}, {"prompt": "q", "chosen": "2", "rejected": "1"},
            {"prompt": "p" * 50, "chosen": "2", "rejected": "1"}]
    pairs, report = load_pairs(_write(tmp_path / "p.jsonl", rows), enc, 60, max_prompt_length=30)
    assert len(pairs) == 1 and report.dropped == {"too_long": 1, "prompt_too_long": 1}


def test_malformed_row_names_file_and_row(tmp_path, tiny_tokenizer):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "rejected": "b"}])
    with pytest.raises(UserError, match=r"p\.jsonl row 2: missing key 'chosen'"):
        load_pairs(path, Encoder(tiny_tokenizer), 64)
    pairs, report = load_pairs(path, Encoder(tiny_tokenizer), 64, on_malformed="skip")
    assert len(pairs) == 1 and report.dropped == {"malformed": 1} and "row 2" in report.malformed[0]
    bad_json = _write(tmp_path / "j.jsonl", ['{"prompt": "q", "chosen": "a", "rejected": "b"}', "{not json"])
    with pytest.raises(UserError, match=r"j\.jsonl row 2: not valid JSON"):
        load_pairs(bad_json, Encoder(tiny_tokenizer), 64)


def test_parquet_and_pair_folder_sources(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 3
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    assert resolve_sources(str(tmp_path), "pairs") == tmp_path / "pairs.parquet"
    assert resolve_sources(str(tmp_path), "sft") == tmp_path / "pairs.parquet"  # SFT on chosen traces
    pairs, _ = load_pairs(tmp_path / "pairs.parquet", Encoder(tiny_tokenizer), 64)
    sft, _ = load_sft(tmp_path / "pairs.parquet", Encoder(tiny_tokenizer), 64)
    assert len(pairs) == len(sft) == 3
    np.testing.assert_array_equal(sft[0].completion, pairs[0].chosen.completion)
    with pytest.raises(UserError, match="data path not found"):
        resolve_sources(str(tmp_path / "nope.jsonl"), "pairs")


def test_step_plan_is_seeded_and_covers_epochs():
    plan = StepPlan(n_examples=10, batch_size=4, micro_batch_size=2, epochs=2, max_steps=0, seed=7)
    assert plan.steps_per_epoch == 2 and plan.total_steps == 4
    first_epoch = np.concatenate([plan.step_indices(0), plan.step_indices(1)])
    assert len(set(first_epoch.tolist())) == 8  # no repeats within an epoch; 2 examples dropped
    again = StepPlan(10, 4, 2, 2, 0, 7)
    assert all((plan.step_indices(s) == again.step_indices(s)).all() for s in range(4))
    assert not (plan.step_indices(2) == StepPlan(10, 4, 2, 2, 0, 8).step_indices(2)).all()


def test_lr_schedule_matches_hf_linear_warmup():
    torch = pytest.importorskip("torch")
    from transformers import get_linear_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1e-3)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=25)
    for step in range(25):
        assert lr_at(step, 25, 1e-3, 0.1) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-15)
        opt.step()
        sched.step()
