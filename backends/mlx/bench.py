"""Step-time comparison of the MLX and torch CPU backends on one random Qwen2 (numbers in docs/mlx.md).

    python -m redi.backends.mlx.bench --hidden 256 --layers 4 --vocab 4096 --seqs 4 --length 256

Both backends get bit-identical weights and the same micro-batch; the timed step is one
forward_backward (REDI loss on pairs) plus optimizer_step, run alternately so machine load hits both alike.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import redi.backends.mlx  # noqa: F401 - preloads OpenBLAS before mlx.core
from redi.backend import MicroBatch
from redi.data import TokenizedSeq
from redi.objectives import PairStats, make_objective
from redi.tiny import TinyQwen2, build_tokenizer, qwen2_config, random_qwen2_weights


def build(out: Path, shape: TinyQwen2, vocab: int) -> Path:
    from safetensors.numpy import save_file

    build_tokenizer(out)
    (out / "config.json").write_text(json.dumps(qwen2_config(shape, vocab, 0), indent=2))
    save_file(random_qwen2_weights(shape, vocab, 0), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def batch(n_pairs: int, length: int, prompt: int, vocab: int) -> MicroBatch:
    rng = np.random.default_rng(0)
    seqs = [TokenizedSeq(rng.integers(1, vocab, prompt).astype(np.int32),
                         rng.integers(1, vocab, length - prompt - int(rng.integers(0, 16))).astype(np.int32))
            for _ in range(2 * n_pairs)]
    return MicroBatch(seqs, n_pairs, 1.0, np.arange(n_pairs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--only", default="torch,mlx,mlx-compile")
    # On a loaded 2-core box torch's default 2 OpenMP threads ran 75x slower than 1 (spin-waiting).
    ap.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads; 0 keeps torch's default")
    args = ap.parse_args()
    from redi.backends.mlx import _blas
    from redi.backends.mlx.backend import MLXBackend

    shape = TinyQwen2(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75) // 8 * 8,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=max(2048, args.length))
    path = build(Path(tempfile.mkdtemp()), shape, args.vocab)
    mb = batch(args.pairs, args.length, 32, args.vocab)
    objective = make_objective("redi")

    def loss(ops, s, lengths):
        n = args.pairs
        return objective(ops, PairStats(s[:n], lengths[:n], s[n:], lengths[n:]))[0]

    backends = {}
    for name in args.only.split(","):
        if name == "torch":
            from redi.backends.torch_cuda.backend import TorchBackend

            import torch

            if args.torch_threads:
                torch.set_num_threads(args.torch_threads)
            backends[name] = TorchBackend("cpu")
        else:
            backends[name] = MLXBackend(compile=name == "mlx-compile")
        backends[name].load(str(path))
        backends[name].init_optimizer(weight_decay=0.0)
    times: dict[str, list[float]] = {k: [] for k in backends}
    for step in range(args.steps + 1):  # step 0 warms up (and compiles)
        for name, be in backends.items():
            t = time.perf_counter()
            be.forward_backward(mb, loss)
            be.optimizer_step(1e-5, 1.0)
            if step:
                times[name].append(time.perf_counter() - t)
    params = next(iter(backends.values())).num_parameters()
    print(json.dumps({"parameters": params, "tokens_per_step": mb.tokens, "openblas": _blas.LOADED,
                      "torch_threads": args.torch_threads or "default",
                      "median_step_s": {k: round(float(np.median(v)), 4) for k, v in times.items()}}))


if __name__ == "__main__":
    main()
