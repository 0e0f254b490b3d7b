"""MLX backend: the torch backend's semantics on Apple silicon (and on Linux through mlx[cpu]).

fp32 master weights and AdamW state (bf16 compute and bf16 moments as options); gradients of each
micro-batch are accumulated in fp32 until ``optimizer_step``; the LM head streams over completion
positions only (``logprobs.py``); padding is rounded to ``PAD_MULTIPLE`` so MLX sees few distinct shapes;
activation checkpointing is planned per micro-batch (``checkpointing.py``). LoRA/DoRA come from mlx-lm's
tuner. Checkpoints are HF directories (``io.py``). Parity with the torch backend: tests/test_mlx_backend.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

from redi.backends.mlx import checkpointing, io, logprobs, lora as mlx_lora
from redi.backends.mlx import linear as row_major_grads
from redi.backends.mlx.generate import generate_batch
from redi.backends.mlx.optim import GROUP_ELEMENTS, AdamW, clip_coefficient, global_norm, norm, spread, streams
from redi.training.batching import token_groups
from redi.backend import MicroBatch, apply_options
from redi.option_checks import check_precision
from redi.layer_checkpointing import checkpointing_mode, fixed_checkpoint_layers, token_budget
from redi.errors import UserError
from redi.lora import ADAPTER_DIR, LoraSpec

# mlx-lm's trainer rounds to 32 too: bounded padding waste and a bounded number of shapes per run.
PAD_MULTIPLE = 32
OPTIMIZER_FILE = "optimizer.safetensors"


class MLXOps:
    """The objectives' array ops on MLX arrays (fp32)."""

    @staticmethod
    def log_sigmoid(x: mx.array) -> mx.array:
        return -mx.logaddexp(0.0, -x)

    @staticmethod
    def mean(x: mx.array) -> mx.array:
        return mx.mean(x)

    @staticmethod
    def sum(x: mx.array) -> mx.array:
        return mx.sum(x)

    @staticmethod
    def asarray(x: Any) -> mx.array:
        return mx.array(np.asarray(x, dtype=np.float32))

    @staticmethod
    def log1mexp(x: mx.array) -> mx.array:
        return mx.log(-mx.expm1(x))

    @staticmethod
    def exp(x: mx.array) -> mx.array:
        return mx.exp(x)

    @staticmethod
    def stop_gradient(x: mx.array) -> mx.array:
        return mx.stop_gradient(x)


@dataclass
class MLXOptions:
    """The speed/memory config keys (redi.backend.SPEED_KEYS), read the MLX way."""

    packing: bool | str = "auto"  # accepted for the shared config; MLX always runs right-padded, 32-rounded batches
    activation_checkpointing: str = "auto"  # none | full | N | auto | auto:GB (auto plans on Apple GPUs only)
    compile: bool | str = False  # mx.compile the log-prob graph; bit-identical, no gain measured (auto: off)
    optim_state_dtype: str = "fp32"  # AdamW moments: fp32, or bf16 (as the torch backend's option)


class MLXBackend:
    def __init__(self, seed: int = 0, *, lora: LoraSpec | None = None, **options: Any):
        self.name = "mlx"
        self.ops = MLXOps()
        self.seed = seed
        self.lora = lora  # LoRA/DoRA adapters over a frozen base (mlx-lm's tuner; conventions in redi/lora.py)
        self.options = MLXOptions()
        apply_options(self.options, options, "mlx")
        self.options.compile = self.options.compile == "true"  # auto: no gain measured on MLX yet
        self.rank, self.world_size = 0, 1  # one process: MLX has no multi-process training here
        self.pads_micro_batches = True  # right-padded, 32-rounded batches (no packing on MLX)
        self.model: Any = None
        self.optimizer: AdamW | None = None
        self._grads: dict[str, mx.array] | None = None

    # ------------------------------------------------------------------ loading and saving

    def load(self, model_path: str, *, precision: str = "auto", lm_head_chunk: int = 1024,
             model_config: dict | None = None) -> None:
        check_precision(precision, self.name)
        # auto is fp32 here: MLX has no autocast, and bf16 pays off only on Apple GPUs.
        self.compute_dtype = mx.bfloat16 if precision == "bf16" else mx.float32
        self.lm_head_chunk = lm_head_chunk
        mx.random.seed(self.seed)
        self.model, self.config, self.source = io.load_model(model_path, model_config)
        self.model.eval()  # dropout off, as TRL's disable_dropout does for the torch backend
        self._check_head()
        if self.lora:
            mlx_lora.wrap(self.model, self.lora, self.seed)
            if self.compute_dtype != mx.float32:
                # The frozen base receives no updates, so it can live in the compute dtype (released
                # checkpoints are bf16 anyway); only the adapters keep fp32 masters.
                trainable = set(self._trainable())
                self.model.load_weights([(k, v.astype(self.compute_dtype)) for k, v in
                                         tree_flatten(self.model.parameters()) if k not in trainable], strict=False)
            mx.eval(self.model.parameters())
        else:
            row_major_grads.install(self.model)
        if checkpointing_mode(self.options.activation_checkpointing)[0] != "none":
            checkpointing.install(self.model.layers)
        self._fn = self._make_logps_fn()
        self.optimizer, self._grads, self.checkpointed_layers = None, None, 0

    def _check_head(self) -> None:
        """Refuse architectures whose logits are not ``lm_head(model.model(x))`` (e.g. soft-capped logits)."""
        ids = mx.array([[1, 2, 3, 4]], dtype=mx.int32)
        try:
            want = self.model(ids)[0, :-1].astype(mx.float32)
            want = mx.take_along_axis(want, ids[0, 1:, None], -1)[:, 0] - mx.logsumexp(want, -1)
            hidden = logprobs.decoder_hidden(self.model, ids)[0, :-1]
            got = logprobs.token_logps(self.model, hidden, ids[0, 1:], 4, checkpoint=False)
            ok = bool(mx.allclose(want, got, atol=1e-4))
        except (AttributeError, TypeError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"--backend mlx does not support {self.config.get('model_type')} models yet "
                            "(logits are not lm_head(model.model(x)))")

    def num_parameters(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.model.parameters()))

    def num_trainable_parameters(self) -> int:
        return sum(v.size for v in self._trainable().values())

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def save_model(self, path: str | None) -> None:
        if path is None:  # None only reaches ranks other than 0, which a one-process backend never has
            return
        io.save_model(self.model, self.config, self.source, Path(path))
        if self.lora:  # the adapter beside the merged model
            mlx_lora.save_adapter(self.model, self.lora, Path(path) / ADAPTER_DIR, str(self.source))

    def save_checkpoint(self, path: str | None) -> None:
        """The model folder (under LoRA the adapter instead: the base does not change) plus the optimizer state:
        what ``load_checkpoint`` reads."""
        if path is None:
            return
        out = Path(path)
        if self.lora:
            mlx_lora.save_adapter(self.model, self.lora, out, str(self.source))
        else:
            self.save_model(path)
        if self.optimizer is not None:
            arrays, metadata = self.optimizer.state()
            mx.save_safetensors(str(out / OPTIMIZER_FILE), arrays, metadata=metadata)

    def load_checkpoint(self, path: str) -> None:
        folder = Path(path)
        if self.lora:
            mlx_lora.load_adapter(self.model, folder)  # the base is unchanged; only the adapters resume
        else:
            io.load_weights(self.model, folder)
        if (folder / OPTIMIZER_FILE).exists() and self.optimizer is not None:
            arrays, metadata = mx.load(str(folder / OPTIMIZER_FILE), return_metadata=True)
            try:
                self.optimizer.load(arrays, metadata)
            except KeyError as err:
                raise UserError(f"checkpoint {path}: {err.args[0]}") from None
        mx.eval(self.model.parameters())

    # ------------------------------------------------------------------ training

    def _trainable(self) -> dict[str, mx.array]:
        return dict(tree_flatten(self.model.trainable_parameters()))

    def init_optimizer(self, *, weight_decay: float) -> None:
        state_dtype = mx.bfloat16 if self.options.optim_state_dtype == "bf16" else mx.float32
        self.optimizer = AdamW(self._trainable(), weight_decay, state_dtype=state_dtype)
        self._grads = None
        checkpointing.keep_freed_buffers(self._static_bytes())

    def _make_logps_fn(self):
        """S as a function of (trainable params, batch arrays); compiled when asked and differentiable."""
        model, chunk, dtype = self.model, self.lm_head_chunk, self.compute_dtype

        def logps(params, ids, positions, targets, segments):
            if dtype != mx.float32:
                params = tree_map(lambda p: p.astype(dtype), params)
            model.update(params)
            return logprobs.sequence_logps(model, ids, positions, targets, segments, chunk, differentiable=True)

        if not self.options.compile:
            return logps

        compiled = mx.compile(logps)

        def run(params, *arrays):
            # Tracing swaps placeholders into the model; put the real arrays back whatever happens.
            try:
                return compiled(params, *arrays)
            finally:
                model.update(params)

        return run

    def _scored(self, batch: MicroBatch) -> logprobs.Scored:
        pad = self.config.get("pad_token_id")
        return logprobs.scored_positions(batch.padded(pad if pad is not None else 0, PAD_MULTIPLE))

    def _plan_checkpointing(self, scored: logprobs.Scored) -> None:
        if checkpointing_mode(self.options.activation_checkpointing)[0] == "none":
            return
        b, w = scored.input_ids.shape
        self.checkpointed_layers = checkpointing.plan(
            self.options.activation_checkpointing, self.config, tokens=b * w, width=w, seqs=b,
            static_bytes=self._static_bytes(), compute_bytes=self.compute_dtype.size, lm_head_chunk=self.lm_head_chunk)
        checkpointing.apply(self.model.layers, self.checkpointed_layers)

    def _static_bytes(self) -> float:
        """Weights + gradient accumulator + a fresh micro-batch gradient + AdamW moments + the compute copy."""
        trainable = sum(v.nbytes for v in self._trainable().values())  # fp32
        state = 2 * trainable * (2 if self.options.optim_state_dtype == "bf16" else 4) // 4  # m and v
        copy = trainable * self.compute_dtype.size // 4 if self.compute_dtype != mx.float32 else 0  # cast weights
        return sum(v.nbytes for _, v in tree_flatten(self.model.parameters())) + 2 * trainable + state + copy

    def micro_batch_token_budget(self, longest: int) -> int:
        """Tokens whose activations fit the free memory (``checkpointing.free_bytes``) with the layers
        ``activation_checkpointing`` fixes recomputed (auto: none), in right-padded rows of ``longest`` tokens
        (the unfused attention's [T x T] matrices grow with the row, not only with the tokens)."""
        mode = self.options.activation_checkpointing
        free = checkpointing.free_bytes(self._static_bytes(), checkpointing_mode(mode)[1])
        recomputed = fixed_checkpoint_layers(mode, self.config["num_hidden_layers"]) or 0
        width = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE

        def activations(tokens: int) -> float:
            return checkpointing.activation_bytes(self.config, tokens, width, -(-tokens // width), recomputed,
                                                  self.compute_dtype.size, self.lm_head_chunk)

        return token_budget(free, activations)

    def forward_backward(self, batch: MicroBatch, loss_fn) -> tuple[np.ndarray, np.ndarray]:
        scored = self._scored(batch)
        self._plan_checkpointing(scored)
        lengths = mx.array(scored.lengths.astype(np.float32))
        params = self.model.trainable_parameters()

        def loss_of(p):
            s = self._fn(p, *scored.arrays())
            return loss_fn(self.ops, s, lengths), s

        if self.lora and self.lora.dropout:
            mlx_lora.set_dropout(self.model, True)
        try:
            (_, s), grads = mx.value_and_grad(loss_of)(params)
        finally:
            self.model.update(params)  # the fp32 masters, not the (cast) arrays seen while differentiating
            if self.lora and self.lora.dropout:
                mlx_lora.set_dropout(self.model, False)
        grads = dict(tree_flatten(grads))
        self._grads = grads if self._grads is None else {k: self._grads[k] + g for k, g in grads.items()}
        mx.eval(s, self._grads)
        return np.array(s, dtype=np.float64), scored.lengths

    def sequence_logps(self, batch: MicroBatch) -> tuple[np.ndarray, np.ndarray]:
        scored = self._scored(batch)
        params = self.model.trainable_parameters()
        if self.compute_dtype != mx.float32:
            # DPO's reference must see the precision training sees, or S - R starts off zero.
            self.model.update(tree_map(lambda p: p.astype(self.compute_dtype), params))
        try:
            s = logprobs.sequence_logps(self.model, *scored.arrays(), self.lm_head_chunk, differentiable=False)
            mx.eval(s)
        finally:
            self.model.update(params)
        return np.array(s, dtype=np.float64), scored.lengths

    def optimizer_step(self, lr: float, max_grad_norm: float) -> dict[str, float]:
        if self._grads is None:
            raise RuntimeError("optimizer_step before any forward_backward")
        grads, self._grads = self._grads, None
        grad_norm = global_norm(list(grads.values()))
        mx.eval(grad_norm)
        if not np.isfinite(float(grad_norm)):
            return {"grad_norm": float(grad_norm), "update_norm": float("nan"), "skipped": 1.0}
        coef = clip_coefficient(grad_norm, max_grad_norm)
        self.optimizer.begin_step()
        current = self._trainable()
        names, lanes = list(current), streams()
        changes = []
        for group in token_groups([current[n].size for n in names], GROUP_ELEMENTS):
            updated = []
            for k, lane in zip(group, spread([current[names[k]].size for k in group], len(lanes))):
                with mx.stream(lanes[lane]):  # popped: the old tensors die once the model lets go of them
                    after, change = self.optimizer.update_one(names[k], current.pop(names[k]), grads.pop(names[k]),
                                                              lr, coef)
                updated.append((names[k], after))
                changes.append(change)
            mx.eval([a for _, a in updated], [self.optimizer.m[n] for n, _ in updated],
                    [self.optimizer.v[n] for n, _ in updated], changes[-len(updated):])
            self.model.load_weights(updated, strict=False)  # frees the old tensors as we go
        # as torch: the norm of the per-tensor norms
        update_norm = norm(mx.stack([mx.sqrt(c) for c in changes]))
        return {"grad_norm": float(grad_norm), "update_norm": float(update_norm)}

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, eos_id: int, batch_size: int = 64, stop_ids: Sequence[int] = ()) -> list[list[int]]:
        return generate_batch(self.model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, key=mx.random.key(seed), eos_id=eos_id, stop_ids=stop_ids,
                              batch_size=batch_size)
