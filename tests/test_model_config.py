"""`model_config:` edits the model's config.json at load on both backends and stays in every saved model.

The paper's edit (rope_theta 300000, max_position_embeddings 32768; redi-spec.md §10 pitfall 8) changes the
RoPE base, so the log-probs of a long sequence change. The edited load must equal what transformers computes
from a copy of the folder whose config.json was edited by hand (what the authors did), and a saved checkpoint
must load to the same numbers with no edit given.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from redi.backend import MicroBatch  # noqa: E402
from redi.backends.torch_cuda.backend import TorchBackend  # noqa: E402
from redi.data import Encoder  # noqa: E402
from redi.errors import UserError  # noqa: E402

PAPER_EDIT = {"rope_theta": 300000.0, "max_position_embeddings": 32768}


def _long_batch(tokenizer) -> MicroBatch:
    enc = Encoder(tokenizer)
    p_text, c_text = enc.texts([{"role": "user", "content": "add 12345 and 67890, step by step"}],
                               [{"role": "assistant", "content": "12345+67890: 5+0=5, 4+9=13 carry 1 " * 8}])
    ids = enc.encode_many([p_text, c_text])
    seq = enc.finish(ids[0], ids[1], 0)
    assert len(seq.prompt) + len(seq.completion) > 250  # long enough for the RoPE base to matter
    return MicroBatch([seq], 0, 1.0, np.arange(1))


def _hand_edited_reference(model_dir: str, tmp: Path, batch: MicroBatch) -> float:
    """The authors' way: edit config.json in a copy, load with transformers, full logits, sum the completion."""
    from transformers import AutoModelForCausalLM

    edited = tmp / "hand-edited"
    shutil.copytree(model_dir, edited)
    cfg = json.loads((edited / "config.json").read_text())
    cfg["rope_parameters"]["rope_theta"] = PAPER_EDIT["rope_theta"]
    cfg["max_position_embeddings"] = PAPER_EDIT["max_position_embeddings"]
    (edited / "config.json").write_text(json.dumps(cfg))
    model = AutoModelForCausalLM.from_pretrained(edited, dtype=torch.float32)
    seq = batch.seqs[0]
    ids = torch.tensor(np.concatenate([seq.prompt, seq.completion]))[None].long()
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    p = len(seq.prompt)
    return sum(float(logp[t - 1, ids[0, t]]) for t in range(p, ids.shape[1]))


def _check_saved_config(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 32768
    assert cfg["rope_theta"] == 300000.0  # the top-level key mlx-lm and vLLM read
    if "rope_parameters" in cfg:
        assert cfg["rope_parameters"]["rope_theta"] == 300000.0  # the one transformers 5 reads


def test_torch_edit_changes_rope_and_survives_save_load(tiny_model_dir, tiny_tokenizer, tmp_path):
    batch = _long_batch(tiny_tokenizer)
    backend = TorchBackend("cpu")
    backend.load(tiny_model_dir)
    base = float(backend.sequence_logps(batch)[0][0])
    backend.load(tiny_model_dir, model_config=PAPER_EDIT)
    edited = float(backend.sequence_logps(batch)[0][0])
    assert abs(edited - base) > 0.5  # RoPE base 1000 -> 300000: a different model on a long sequence
    assert edited == pytest.approx(_hand_edited_reference(tiny_model_dir, tmp_path, batch), abs=1e-3)
    assert json.loads(Path(tiny_model_dir, "config.json").read_text())["rope_parameters"]["rope_theta"] == 1000.0
    backend.save_model(str(tmp_path / "ckpt"))
    _check_saved_config(tmp_path / "ckpt")
    again = TorchBackend("cpu")
    again.load(str(tmp_path / "ckpt"))  # no edit given: the checkpoint carries it
    assert float(again.sequence_logps(batch)[0][0]) == pytest.approx(edited, abs=1e-4)


def test_mlx_edit_matches_torch_and_survives_save_load(tiny_model_dir, tiny_tokenizer, tmp_path):
    pytest.importorskip("mlx.core")
    from redi.backends.mlx.backend import MLXBackend

    batch = _long_batch(tiny_tokenizer)
    torch_backend = TorchBackend("cpu")
    torch_backend.load(tiny_model_dir, model_config=PAPER_EDIT)
    want = float(torch_backend.sequence_logps(batch)[0][0])
    backend = MLXBackend()
    backend.load(tiny_model_dir)
    base = float(backend.sequence_logps(batch)[0][0])
    backend.load(tiny_model_dir, model_config=PAPER_EDIT)
    edited = float(backend.sequence_logps(batch)[0][0])
    assert abs(edited - base) > 0.5
    assert edited == pytest.approx(want, abs=2e-3)
    backend.save_model(str(tmp_path / "mlx-ckpt"))
    _check_saved_config(tmp_path / "mlx-ckpt")
    again = MLXBackend()
    again.load(str(tmp_path / "mlx-ckpt"))
    assert float(again.sequence_logps(batch)[0][0]) == pytest.approx(edited, abs=1e-4)


def test_unknown_key_is_refused_with_its_name(tiny_model_dir):
    with pytest.raises(UserError, match="model_config key 'rope_thetta' is not a key of .*config.json"):
        TorchBackend("cpu").load(tiny_model_dir, model_config={"rope_thetta": 1.0})


def test_train_writes_the_edit_into_every_checkpoint_and_config_yaml(tmp_path):
    import yaml

    from redi.config import apply_overrides, load_config
    from redi.training.api import train

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    cfg = apply_overrides(load_config(tiny), ["backend=cpu", "sft.max_steps=2", "pairs.max_steps=2", "save_every=1",
                                              f"output={tmp_path / 'run'}", "model_config.rope_theta=300000.0",
                                              "model_config.max_position_embeddings=32768"])
    train(cfg)
    run = tmp_path / "run"
    folders = [run / "sft_final", run / "final", *sorted((run / "checkpoints").glob("step-*"))]
    assert len(folders) >= 3
    for folder in folders:
        _check_saved_config(folder)
    assert yaml.safe_load((run / "config.yaml").read_text())["model_config"] == PAPER_EDIT
