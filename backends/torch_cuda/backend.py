"""PyTorch backend: fp32 master weights and AdamW state; bf16 autocast on CUDA; fp32 on the CPU.

Log-probs never materialise ``[tokens x vocab]`` logits: only completion positions reach the LM head,
in chunks, and each chunk is recomputed in the backward pass (see ``logprobs.py``).
"""
from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from redi.backends.torch_cuda import layers, lora as torch_lora
from redi.backends.torch_cuda.attention import (DocumentMask, build_block_mask, flex_available, layer_mask_mapping,
                                               packed_attention_mode, use_document_mask)
from redi.backends.torch_cuda.distributed import (Dist, full_model_state, full_optimizer_state, load_full_model_state,
                                                 load_full_optimizer_state, shard)
from redi.backends.torch_cuda.generate import generate as generate_rows
from redi.backends.torch_cuda.logprobs import packed_sequence_logps, sequence_logps
from redi.backends.torch_cuda.optim import grad_norm_and_clip, make_adamw, step_with_norms
from redi.backends.torch_cuda.ops import TorchOps
from redi.backends.torch_cuda.packing import pack
from redi.backend import MicroBatch, apply_options, edit_model_config, no_weight_decay
from redi.option_checks import check_precision
from redi.errors import UserError
from redi.layer_checkpointing import checkpointing_mode, fixed_checkpoint_layers, host_free_bytes, token_budget
from redi.lora import LoraSpec
from redi.model_dir import copy_tokenizer_files, rope_theta_on_top


def write_top_level_rope_theta(model_dir: Path) -> None:
    """The saved config.json with ``rope_theta`` on top as well (``rope_theta_on_top``: mlx-lm reads it there)."""
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    extra = rope_theta_on_top(cfg)
    if extra:
        cfg_path.write_text(json.dumps({**cfg, **extra}, indent=2))


def _edited_config(model_path: str, edits: dict):
    """The model's transformers config with the run's model_config edits, built before the model is."""
    from transformers import AutoConfig, PretrainedConfig

    raw, _ = PretrainedConfig.get_config_dict(model_path)
    edited = edit_model_config(raw, edits, model_path)
    return type(AutoConfig.from_pretrained(model_path)).from_dict(edited)


def _cache_kwarg(model) -> str:
    """transformers renamed forward's ``past_key_values`` to ``cache`` (5.2x warns on the old name; 5.17 lacks
    the new one)."""
    import inspect

    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class TorchOptions:
    """Speed and memory settings (config keys of the same names; see docs/cuda.md)."""

    packing: bool | str = "auto"  # true: padding-free rows, document mask; false: right-padded; auto: see __init__
    activation_checkpointing: str = "auto"  # none | full | N layers | auto | auto:GB (CUDA; the CPU never plans)
    compile: bool | str = False  # false | true | auto (= CUDA only): torch.compile each decoder layer; eager if it fails
    optim_state_dtype: str = "fp32"  # fp32: torch AdamW (fused on CUDA); bf16: moments in bf16 (-4 B/param)
    update_bucket_gb: float = 1.0  # CUDA: extra memory used to measure the update norm exactly


class TorchBackend:
    def __init__(self, device: str = "cpu", seed: int = 0, lora: LoraSpec | None = None, **options: Any):
        self.name, self.lora = device, lora  # lora: train PEFT adapters over a frozen base (lora.py)
        self.dist = Dist("cuda" if device == "cuda" else "cpu")
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.device = self.dist.device()
        self.ops = TorchOps(self.device)
        self.seed = seed
        self.options = TorchOptions()
        apply_options(self.options, options, "torch")
        # auto: packed on CUDA and under torchrun; padded on a CPU, where the per-document attention of a packed
        # row measured ~10% slower than one padded batch (2 rows of 512 tokens, SmolLM2-135M; docs/speed.md).
        mode = self.options.packing
        self.options.packing = mode == "true" or (mode == "auto" and (device == "cuda" or self.dist.enabled))
        self.pads_micro_batches = not self.options.packing
        if self.world_size > 1 and not self.options.packing:
            raise UserError("multi-process training needs packing=true")
        if self.dist.enabled and self.lora:  # enabled, not world_size: torchrun with one rank shards too
            raise UserError("lora_rank is single-process for now (one GPU); run without torchrun")
        self.model: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.last_checkpointed_layers = 0

    # ------------------------------------------------------------------ loading and saving

    def load(self, model_path: str, *, precision: str = "auto", lm_head_chunk: int = 1024,
             model_config: dict | None = None) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        check_precision(precision, self.name)
        torch.manual_seed(self.seed)
        try:
            # fp32 master weights always: stage 2's lr (1e-6) is below bf16's resolution.
            edited = {"config": _edited_config(model_path, model_config)} if model_config else {}
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa",
                                                         **edited)
        except OSError as err:
            raise UserError(f"cannot load model from {model_path}: {str(err).splitlines()[0]}") from None
        self.adopt(model, precision=precision, lm_head_chunk=lm_head_chunk, model_path=model_path)

    def adopt(self, model: Any, *, precision: str = "auto", lm_head_chunk: int = 1024, model_path: str = "") -> None:
        """Train an in-memory transformers causal LM (the benchmark's random-init models) instead of a folder."""
        self.model_path = model_path
        self.lm_head_chunk = lm_head_chunk
        self.autocast = self.device.type == "cuda" and precision in ("auto", "bf16")
        self.model = model.float()
        self.model.config._attn_implementation = "sdpa"
        if self.lora:
            torch_lora.wrap(self.model, self.lora, self.seed, torch.bfloat16 if self.autocast else None)
        self._prepare_model()

    def _prepare_model(self) -> None:
        """Device, train mode, dropout off, layer wrappers, FSDP2 sharding; the packed forward entry point."""
        self.model.to(self.device)
        # Off while training (no KV cache in a training forward); saved models get the original value back.
        self.saved_use_cache = getattr(self.model.config, "use_cache", True)
        self.model.config.use_cache = False
        self.model.train()
        for name, module in self.model.named_modules():  # TRL's disable_dropout, as the authors trained
            if isinstance(module, torch.nn.Dropout) and ".lora_dropout." not in name:
                module.p = 0.0
        self.layers = list(self.model.get_decoder().layers)
        layers.install(self.layers, compile_layers=self.compile_requested)
        self.memory_model = layers.MemoryModel.of(self.model.config)
        self.use_flex = self.device.type == "cuda" and flex_available()
        model, original_forward = self.model, self.model.forward

        def forward(*args: Any, redi_packed: dict | None = None, **kwargs: Any):
            # Training enters through the root module so that FSDP2's hooks gather its parameters.
            if redi_packed is None:
                return original_forward(*args, **kwargs)
            return packed_sequence_logps(model, **redi_packed)

        self.model.forward = forward
        if self.dist.enabled:
            shard(self.model, self.layers)
        self.optimizer = None

    @property
    def compile_requested(self) -> bool:
        """``compile: true`` compiles on every device; ``auto`` only on CUDA, where it was measured to pay."""
        return self.options.compile == "true" or (self.options.compile == "auto" and self.device.type == "cuda")

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (the loop gathers per-sequence statistics for the metrics)."""
        return self.dist.all_gather_object(obj)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def num_trainable_parameters(self) -> int:
        return torch_lora.trainable_parameters(self.model)

    def save_model(self, path: str | None) -> None:
        """Collective under multi-process (all ranks call it); only rank 0 writes."""
        if self.dist.enabled:
            state = full_model_state(self.model)
            if self.rank == 0 and path is not None:
                self._write_full_state(Path(path), state)
            self.dist.barrier()
            return
        out = Path(path)
        if self.lora:  # the merged model, and the adapter beside it
            self._write_full_state(out, torch_lora.merged_state(self.model))
            torch_lora.save_adapter(self.model, self.lora, torch_lora.adapter_dir(out), self.model_path)
            return
        self.model.save_pretrained(out, safe_serialization=True)
        self._finish_model_dir(out)

    def _write_full_state(self, out: Path, state: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        if self.model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
        self.model.config.save_pretrained(out)
        if getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.save_pretrained(out)
        self._finish_model_dir(out)

    def _finish_model_dir(self, out: Path) -> None:
        write_top_level_rope_theta(out)
        cfg = json.loads((out / "config.json").read_text())
        if cfg.get("use_cache") != self.saved_use_cache:
            cfg["use_cache"] = self.saved_use_cache
            (out / "config.json").write_text(json.dumps(cfg, indent=2))
        if not self.model_path:
            return
        copy_tokenizer_files(Path(self.model_path), out)

    def save_checkpoint(self, path: str | None) -> None:
        """The model folder (under LoRA the adapter instead: the base does not change) plus ``optimizer.pt``;
        collective under multi-process, as ``save_model``."""
        if self.lora:
            return torch_lora.save_checkpoint(self.model, self.lora, self.optimizer, Path(path), self.model_path)
        self.save_model(path)
        if self.dist.enabled:
            state = full_optimizer_state(self.model, self.optimizer) if self.optimizer else None
            if self.rank == 0 and path is not None:
                torch.save({"optimizer": state, "full": True}, os.path.join(path, "optimizer.pt"))
            self.dist.barrier()
            return
        torch.save({"optimizer": self.optimizer.state_dict() if self.optimizer else None}, os.path.join(path, "optimizer.pt"))

    def load_checkpoint(self, path: str) -> None:
        from safetensors.torch import load_file

        if self.lora:  # the base is unchanged since load: the adapter and its optimizer state resume
            return torch_lora.load_checkpoint(self.model, self.optimizer, Path(path), self.device)
        state = load_file(os.path.join(path, "model.safetensors"), device="cpu" if self.dist.enabled else str(self.device))
        opt = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu" if self.dist.enabled else self.device,
                         weights_only=True)
        if self.dist.enabled:
            if self.model.config.tie_word_embeddings and "lm_head.weight" not in state:
                state["lm_head.weight"] = state["model.embed_tokens.weight"]
            load_full_model_state(self.model, state)
            if opt["optimizer"] is not None and self.optimizer is not None:
                load_full_optimizer_state(self.model, self.optimizer, opt["optimizer"])
            return
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise UserError(f"checkpoint {path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if self.model.config.tie_word_embeddings:
            self.model.tie_weights()
        if opt["optimizer"] is not None and self.optimizer is not None:
            self.optimizer.load_state_dict(opt["optimizer"])

    # ------------------------------------------------------------------ training

    def init_optimizer(self, *, weight_decay: float) -> None:
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if no_weight_decay(name, p.ndim) else decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = make_adamw(groups, self.device, self.options.optim_state_dtype)
        self.optimizer.zero_grad(set_to_none=True)

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext()

    def _padded_logps(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        pad = self.model.config.pad_token_id
        pad = pad if pad is not None else 0
        t = {k: torch.from_numpy(v).to(self.device) for k, v in batch.padded(pad).items()}
        if torch.is_grad_enabled():
            self._plan_checkpointing(t["input_ids"].numel())
        with self._autocast():
            return sequence_logps(self.model, t["input_ids"], t["attention_mask"], t["label_mask"], self.lm_head_chunk)

    def _packed_logps(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        pad = self.model.config.pad_token_id
        row = pack(batch, pad if pad is not None else 0)
        dev = self.device

        def put(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(dev, non_blocking=True)

        if self.use_flex:
            mask = build_block_mask(row.doc_lens, dev)
        else:
            mask = DocumentMask(row.doc_lens, row.n_seqs)
        use_document_mask(mask)  # for decoders that drop the mask mapping below (LlamaModel)
        if torch.is_grad_enabled():
            self._plan_checkpointing(row.width)
        inputs = {
            "input_ids": put(row.input_ids)[None], "position_ids": put(row.position_ids)[None],
            "attention_mask": layer_mask_mapping(self.model.config, mask), "score_pos": put(row.score_pos),
            "targets": put(row.targets), "seq_of": put(row.seq_of), "n_seqs": row.n_seqs, "chunk": self.lm_head_chunk,
        }
        with self._autocast():
            logps = self.model(redi_packed=inputs)
        return logps, torch.from_numpy(row.lengths)

    def _memory_terms(self) -> tuple[float, float]:
        """Bytes training holds besides activations (static: weights, gradients, AdamW moments, the ones not
        allocated yet included) and the LM head's workspace, for the activation planners."""
        state_bytes = 2 if self.options.optim_state_dtype == "bf16" else 4
        grads = any(p.grad is not None for p in self.model.parameters())
        states = self.optimizer is not None and bool(self.optimizer.state)
        trainable = self.num_trainable_parameters()
        if self.device.type == "cuda":
            static = layers.static_bytes_estimate(trainable, self.world_size, state_bytes, grads_present=grads,
                                                  states_present=states, layers=len(self.layers))
        else:  # host memory: the weights are already counted out of the available memory; what is still to come
            static = (0.0 if grads else 4.0 * trainable) + (0.0 if states else 2.0 * state_bytes * trainable)
        head = self.model.get_output_embeddings().weight
        return static, layers.lm_head_workspace(self.lm_head_chunk, head.shape[0], head.shape[1])

    def _plan_checkpointing(self, tokens: int) -> None:
        static, work = self._memory_terms()
        k = layers.plan(self.options.activation_checkpointing, self.memory_model, tokens, device=self.device,
                        static_bytes=static if self.device.type == "cuda" else 0.0, workspace_bytes=work)
        layers.set_checkpointed(self.layers, k)
        self.last_checkpointed_layers = k

    def micro_batch_token_budget(self, longest: int) -> int:
        """Tokens whose activations fit the free memory (the GPU's, or a share of the host's) with the layers
        ``activation_checkpointing`` fixes recomputed (auto: none, so the budget never forces recomputation)."""
        mode = self.options.activation_checkpointing
        static, work = self._memory_terms()
        if self.device.type == "cuda":
            free = layers.cuda_free_bytes(self.device, checkpointing_mode(mode)[1], static, work)
        else:
            free = host_free_bytes(static + work)
        recomputed = fixed_checkpoint_layers(mode, len(self.layers)) or 0
        return token_budget(free, lambda t: self.memory_model.activation_bytes(t, recomputed))

    def _logps(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return self._packed_logps(batch) if self.options.packing else self._padded_logps(batch)

    def forward_backward(self, batch: MicroBatch, loss_fn) -> tuple[np.ndarray, np.ndarray]:
        # The packed attention stays routed through the backward pass: checkpointed layers re-run there.
        with packed_attention_mode(self.model):
            logps, lengths = self._logps(batch)
            loss = loss_fn(self.ops, logps, lengths.to(device=logps.device, dtype=logps.dtype))
            if self.dist.enabled:
                loss = loss * self.world_size  # FSDP2 averages over ranks; each loss is already a global share
            loss.backward()
        return logps.detach().double().cpu().numpy(), lengths.cpu().numpy()

    @torch.no_grad()
    def sequence_logps(self, batch: MicroBatch) -> tuple[np.ndarray, np.ndarray]:
        with packed_attention_mode(self.model):
            logps, lengths = self._logps(batch)
        return logps.double().cpu().numpy(), lengths.cpu().numpy()

    @torch.no_grad()
    def optimizer_step(self, lr: float, max_grad_norm: float) -> dict[str, float]:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = grad_norm_and_clip(params, max_grad_norm, self.dist)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return {"grad_norm": float(grad_norm), "update_norm": float("nan"), "skipped": 1.0}
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        bucket = None
        if self.device.type == "cuda":
            bucket = max(1, int(self.options.update_bucket_gb * (1 << 30) / 4))
        # The paper's collapse signal: the norm of the parameter change this step made.
        update_norm = step_with_norms(self.optimizer, params, self.dist, bucket)
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(grad_norm), "update_norm": update_norm}

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, eos_id: int, batch_size: int = 64, stop_ids: Sequence[int] = ()) -> list[list[int]]:
        """Continuous batching over ``batch_size`` rows (backends/torch_cuda/generate.py); a row stops at
        ``eos_id`` or any of ``stop_ids``; ``eos_id`` also pads."""
        self.model.eval()
        self.model.config.use_cache = True
        gen = torch.Generator(device=self.device).manual_seed(seed)
        try:
            return generate_rows(self.model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p, gen=gen, stop_ids={eos_id, *stop_ids}, pad_id=eos_id,
                                 batch_size=batch_size, device=self.device, autocast=self._autocast,
                                 cache_kwarg=_cache_kwarg(self.model))
        finally:
            self.model.config.use_cache = False
            self.model.train()


