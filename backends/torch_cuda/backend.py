"""PyTorch backend: fp32 master weights and AdamW state; bf16 autocast on CUDA; fp32 on the CPU.

Log-probs never materialise ``[tokens x vocab]`` logits: only completion positions reach the LM head,
in chunks, and each chunk is recomputed in the backward pass (see ``logprobs.py``).
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from redi.backends.torch_cuda.logprobs import sequence_logps
from redi.batching import MicroBatch
from redi.errors import UserError

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "generation_config.json",
)


class TorchOps:
    @staticmethod
    def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.logsigmoid(x)

    @staticmethod
    def mean(x: torch.Tensor) -> torch.Tensor:
        return x.mean()

    @staticmethod
    def sum(x: torch.Tensor) -> torch.Tensor:
        return x.sum()

    def __init__(self, device: torch.device):
        self.device = device

    def asarray(self, x: Any) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x), dtype=torch.float32, device=self.device)


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    # HF Trainer's rule, which the authors' runs used: no weight decay on biases and norm weights.
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def write_top_level_rope_theta(model_dir: Path) -> None:
    """transformers 5 keeps rope_theta only in rope_parameters; mlx-lm reads the top-level key."""
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
        cfg_path.write_text(json.dumps(cfg, indent=2))


class TorchBackend:
    def __init__(self, device: str = "cpu", seed: int = 0):
        self.name = device
        self.device = torch.device("cuda" if device == "cuda" else "cpu")
        self.ops = TorchOps(self.device)
        self.seed = seed
        self.model: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._before: list[torch.Tensor] | None = None

    # ------------------------------------------------------------------ loading and saving

    def load(self, model_path: str, *, precision: str = "auto", lm_head_chunk: int = 1024) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        self.model_path = model_path
        self.lm_head_chunk = lm_head_chunk
        if precision == "bf16" and self.device.type != "cuda":
            raise UserError("precision bf16 needs --backend cuda; the CPU backend computes in fp32")
        self.autocast = self.device.type == "cuda" and precision in ("auto", "bf16")
        torch.manual_seed(self.seed)
        try:
            # fp32 master weights always: stage 2's lr (1e-6) is below bf16's resolution.
            self.model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=torch.float32, attn_implementation="sdpa"
            )
        except OSError as err:
            raise UserError(f"cannot load model from {model_path}: {str(err).splitlines()[0]}") from None
        self.model.to(self.device)
        self.model.config.use_cache = False
        self.model.train()
        for module in self.model.modules():  # TRL's disable_dropout, as the authors trained
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def save_model(self, path: str) -> None:
        out = Path(path)
        self.model.save_pretrained(out, safe_serialization=True)
        write_top_level_rope_theta(out)
        src = Path(self.model_path)
        for name in TOKENIZER_FILES:
            if (src / name).exists() and not (out / name).exists():
                shutil.copy2(src / name, out / name)

    def save_state(self, path: str) -> None:
        torch.save({"optimizer": self.optimizer.state_dict() if self.optimizer else None}, os.path.join(path, "optimizer.pt"))

    def load_state(self, path: str) -> None:
        from safetensors.torch import load_file

        state = load_file(os.path.join(path, "model.safetensors"), device=str(self.device))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise UserError(f"checkpoint {path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if self.model.config.tie_word_embeddings:
            self.model.tie_weights()
        opt = torch.load(os.path.join(path, "optimizer.pt"), map_location=self.device, weights_only=True)
        if opt["optimizer"] is not None and self.optimizer is not None:
            self.optimizer.load_state_dict(opt["optimizer"])

    # ------------------------------------------------------------------ training

    def start_stage(self, *, weight_decay: float) -> None:
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if _no_decay(name, p) else decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), eps=1e-8, fused=fused)
        self.optimizer.zero_grad(set_to_none=True)

    def _tensors(self, batch: MicroBatch) -> dict[str, torch.Tensor]:
        pad = self.model.config.pad_token_id
        pad = pad if pad is not None else 0
        return {k: torch.from_numpy(v).to(self.device) for k, v in batch.padded(pad).items()}

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext()

    def _logps(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        t = self._tensors(batch)
        with self._autocast():
            return sequence_logps(self.model, t["input_ids"], t["attention_mask"], t["label_mask"], self.lm_head_chunk)

    def forward_backward(self, batch: MicroBatch, loss_fn) -> tuple[np.ndarray, np.ndarray]:
        logps, lengths = self._logps(batch)
        loss = loss_fn(self.ops, logps, lengths.to(logps.dtype))
        loss.backward()
        return logps.detach().double().cpu().numpy(), lengths.cpu().numpy()

    @torch.no_grad()
    def sequence_logps(self, batch: MicroBatch) -> tuple[np.ndarray, np.ndarray]:
        logps, lengths = self._logps(batch)
        return logps.double().cpu().numpy(), lengths.cpu().numpy()

    @torch.no_grad()
    def optimizer_step(self, lr: float, max_grad_norm: float) -> dict[str, float]:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        if max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return {"grad_norm": float(grad_norm), "update_norm": float("nan"), "skipped": 1.0}
        if self._before is None:
            self._before = [p.detach().clone() for p in params]
        else:
            torch._foreach_copy_(self._before, [p.detach() for p in params])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # The paper's collapse signal: the norm of the parameter change this step made.
        deltas = torch._foreach_sub([p.detach() for p in params], self._before)
        update_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(deltas)))
        return {"grad_norm": float(grad_norm), "update_norm": float(update_norm)}

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, eos_id: int, batch_size: int = 64) -> list[list[int]]:
        self.model.eval()
        self.model.config.use_cache = True
        outputs: list[list[int]] = []
        gen = torch.Generator(device=self.device).manual_seed(seed)
        try:
            for start in range(0, len(prompts), batch_size):
                outputs.extend(self._generate_batch(prompts[start:start + batch_size], max_new_tokens,
                                                    temperature, top_p, gen, eos_id))
        finally:
            self.model.config.use_cache = False
            self.model.train()
        return outputs

    def _generate_batch(self, prompts, max_new_tokens, temperature, top_p, gen, eos_id) -> list[list[int]]:
        # A plain sampling loop with a KV cache, left-padded: deterministic under our own Generator,
        # unlike HF generate, which draws from the global RNG.
        from transformers import DynamicCache

        n, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((n, width), eos_id, dtype=torch.long, device=self.device)
        attn = torch.zeros((n, width), dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, device=self.device)
            attn[i, width - len(p):] = 1
        cache = DynamicCache()
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        out = torch.zeros((n, 0), dtype=torch.long, device=self.device)
        step_ids = ids
        for _ in range(max_new_tokens):
            position = (attn.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
            with self._autocast():
                logits = self.model(input_ids=step_ids, attention_mask=attn, position_ids=position,
                                    past_key_values=cache, use_cache=True).logits[:, -1].float()
            nxt = sample_next(logits, temperature, top_p, gen)
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == eos_id
            if bool(done.all()):
                break
            step_ids = nxt[:, None]
            attn = torch.cat([attn, torch.ones((n, 1), dtype=attn.dtype, device=self.device)], dim=1)
        result = []
        for row in out.tolist():
            result.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
        return result


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)
