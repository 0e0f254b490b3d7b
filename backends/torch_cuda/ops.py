"""The array operations the pure objectives (redi/objectives.py) run on, for torch tensors."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


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

    @staticmethod
    def log1mexp(x: torch.Tensor) -> torch.Tensor:
        return torch.log(-torch.expm1(x))

    @staticmethod
    def exp(x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)

    @staticmethod
    def stop_gradient(x: torch.Tensor) -> torch.Tensor:
        return x.detach()
