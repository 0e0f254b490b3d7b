"""Multi-process training: torchrun's environment, FSDP2 ``fully_shard``, collectives, full state dicts.

Launch with ``torchrun --nproc-per-node N -m redi train ...`` (N = 1 included: one rank, still sharded). Every rank runs the same loop; the core
gives rank r the micro-batches r, r+N, ... of each optimizer step (padded with zero-weight repeats so that
every rank runs the same number of forward/backward passes), so the global batch is the config's whatever
N is. Losses are already weighted by each micro-batch's share of the step; FSDP2 averages gradients over
ranks, so the backend scales each loss by N to make the reduced gradient the step's full gradient.

CUDA uses NCCL (one GPU per rank, ``LOCAL_RANK``); the CPU uses gloo (tests).
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


class Dist:
    """The process group of this run, or a single process."""

    def __init__(self, device_type: str):
        self.rank, self.world_size, self.local_rank = env_world()
        self.device_type = device_type
        # Under torchrun even one rank runs FSDP2 over a process group, so that one GPU measures what N pay.
        self.launched = self.world_size > 1 or {"WORLD_SIZE", "MASTER_ADDR"} <= os.environ.keys()
        if self.launched and not dist.is_initialized():
            if device_type == "cuda":
                torch.cuda.set_device(self.local_rank)
                dist.init_process_group("nccl", device_id=torch.device("cuda", self.local_rank))
            else:
                dist.init_process_group("gloo")

    @property
    def enabled(self) -> bool:
        return self.launched

    def device(self) -> torch.device:
        if self.device_type == "cuda":
            return torch.device("cuda", self.local_rank if self.enabled else torch.cuda.current_device())
        return torch.device("cpu")

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its storage), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def shard(model: torch.nn.Module, layers: list[torch.nn.Module]) -> None:
    """FSDP2: one unit per decoder layer, the rest (embeddings, final norm, LM head) in the root unit."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict on rank 0, {} elsewhere. Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
