"""Training objectives as pure functions of per-sequence statistics.

Every objective sees only:
  S  summed log-prob of each sequence's completion tokens,
  L  number of completion tokens scored (after truncation; the same tokens that make up S),
  R  the frozen reference model's S (DPO only; zeros otherwise).
It returns ``(loss, rewards_chosen, rewards_rejected)`` where ``loss`` is the mean over pairs (or, for SFT,
the token-level mean over the batch). Backends pass their array module's ops in ``ops`` so one definition
serves torch and MLX alike; arrays support ``+ - * /`` and ``ops`` adds the few functions that differ.

The paper's equations (Xu et al., Eq. 1-5) and the authors' TRL fork fix the exact forms; see
redi-spec.md §2.  In particular REDI normalises each sequence by its *own* length and averages pairs with
equal weight (not a token-level mean over the batch).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np


class ArrayOps(Protocol):
    """The few array functions an objective needs beyond ``+ - * /``; each backend supplies its own."""

    def log_sigmoid(self, x: Any) -> Any: ...
    def mean(self, x: Any) -> Any: ...
    def sum(self, x: Any) -> Any: ...
    def asarray(self, x: Any) -> Any: ...  # a numpy array (e.g. cached reference log-probs) as this module's array
    def log1mexp(self, x: Any) -> Any: ...  # log(1 - exp(x)) for x < 0, computed stably
    def exp(self, x: Any) -> Any: ...
    def stop_gradient(self, x: Any) -> Any: ...  # x's value, through which no gradient flows


class NumpyOps:
    """The objectives' array ops in numpy (float64), for metrics and reference computations."""

    @staticmethod
    def log_sigmoid(x: Any) -> Any:
        return -np.logaddexp(0.0, -x)

    @staticmethod
    def mean(x: Any) -> Any:
        return np.mean(x)

    @staticmethod
    def sum(x: Any) -> Any:
        return np.sum(x)

    @staticmethod
    def asarray(x: Any) -> Any:
        return np.asarray(x, dtype=np.float64)

    @staticmethod
    def log1mexp(x: Any) -> Any:
        return np.log(-np.expm1(x))

    @staticmethod
    def exp(x: Any) -> Any:
        return np.exp(x)

    @staticmethod
    def stop_gradient(x: Any) -> Any:
        return x  # numpy has no gradients


@dataclass(frozen=True)
class PairStats:
    """Per-pair statistics of one (micro-)batch; every field is a 1-D array of length n_pairs."""

    chosen_logps: Any  # S_w
    chosen_lengths: Any  # L_w
    rejected_logps: Any  # S_l
    rejected_lengths: Any  # L_l
    ref_chosen_logps: Any = None  # R_w
    ref_rejected_logps: Any = None  # R_l

    @classmethod
    def from_halves(cls, logps: Any, lengths: Any, ref_logps: Any = None) -> "PairStats":
        """Per-sequence arrays laid out as a pair batch is (``MicroBatch``): every chosen sequence, then every
        rejected one. The one place that layout is read."""
        n = len(logps) // 2
        ref_w, ref_l = (None, None) if ref_logps is None else (ref_logps[:n], ref_logps[n:])
        return cls(logps[:n], lengths[:n], logps[n:], lengths[n:], ref_w, ref_l)

    @classmethod
    def concatenate(cls, parts: list["PairStats"]) -> "PairStats":
        """One step's statistics from its micro-batches' (numpy arrays)."""
        import numpy as np

        fields = [[getattr(p, f.name) for p in parts] for f in dataclasses.fields(cls)]
        return cls(*(None if any(x is None for x in arrays) else np.concatenate(arrays) for arrays in fields))


def sft_loss(ops: ArrayOps, logps: Any, lengths: Any) -> Any:
    """Token-level mean NLL over all completion tokens of the batch (the authors' SFT, HF cross-entropy)."""
    return -ops.sum(logps) / ops.sum(lengths)


def redi_loss(ops: ArrayOps, s: PairStats, *, alpha: float = 0.8, chosen_coef: float = 1.0,
              neg_weighting_gamma: float = 0.0, neg_weighting_detached_gamma: float = 0.0) -> tuple[Any, Any, Any]:
    """Eq. 5: -c_w * S_w/L_w + alpha * w * S_l/L_l, averaged over pairs. No sigmoid, reference or margin.

    As the authors' TRL fork (``loss_type="reinforce"``): c_w is their ``reinforce_chosen_coef`` (1 in every
    recipe), alpha their ``reinforce_rejected_coef``, and w their "negw" weight (off in every recipe):
    w = exp(gamma * S_l/L_l) with ``neg_weighting_gamma`` = gamma and the gradient flowing through w, as theirs
    does; ``neg_weighting_detached_gamma`` is the same weight held constant in the backward pass (not in their
    code). gamma 0 (both, the default) is w = 1, the paper's loss."""
    chosen = s.chosen_logps / s.chosen_lengths
    rejected = s.rejected_logps / s.rejected_lengths
    weight = negative_weight(ops, rejected, neg_weighting_gamma, neg_weighting_detached_gamma)
    rejected_term = alpha * rejected if weight is None else alpha * rejected * weight
    return ops.mean(-chosen_coef * chosen + rejected_term), chosen, rejected


def negative_weight(ops: ArrayOps, rejected: Any, gamma: float, detached_gamma: float) -> Any:
    """The authors' negw weight exp(gamma * P_l) of each rejected trace's length-normalised log-prob P_l, or None
    (weight 1) when both gammas are 0. Their weight is not detached; ``detached_gamma`` gives the detached one."""
    if gamma and detached_gamma:
        raise ValueError("neg_weighting_gamma and neg_weighting_detached_gamma are two variants of one weight; "
                         "set only one")
    if detached_gamma:
        return ops.stop_gradient(ops.exp(detached_gamma * rejected))
    return ops.exp(gamma * rejected) if gamma else None


def symmetric_loss(ops: ArrayOps, s: PairStats) -> tuple[Any, Any, Any]:
    """Eq. 4: the beta -> 0 limit of SimPO, i.e. REDI with alpha = 1."""
    return redi_loss(ops, s, alpha=1.0)


def dpo_loss(ops: ArrayOps, s: PairStats, *, beta: float = 0.001) -> tuple[Any, Any, Any]:
    """Eq. 2 on summed log-probs: -log sigmoid(beta * [(S_w - R_w) - (S_l - R_l)])."""
    chosen = beta * (s.chosen_logps - s.ref_chosen_logps)
    rejected = beta * (s.rejected_logps - s.ref_rejected_logps)
    return ops.mean(-ops.log_sigmoid(chosen - rejected)), chosen, rejected


def simpo_loss(ops: ArrayOps, s: PairStats, *, beta: float = 2.0, gamma: float = 1.0) -> tuple[Any, Any, Any]:
    """Eq. 3: -log sigmoid(beta * (S_w/L_w - S_l/L_l) - gamma). No chosen-NLL term (TRL's cpo_alpha = 0)."""
    chosen = beta * s.chosen_logps / s.chosen_lengths
    rejected = beta * s.rejected_logps / s.rejected_lengths
    return ops.mean(-ops.log_sigmoid(chosen - rejected - gamma)), chosen, rejected


def orpo_loss(ops: ArrayOps, s: PairStats, *, beta: float = 0.1) -> tuple[Any, Any, Any]:
    """ORPO (Hong et al. 2024) as TRL's ORPOTrainer: -S_w/L_w - beta * log sigmoid(log odds_w - log odds_l), where
    log odds = P - log(1 - exp(P)) of the length-normalised log-prob P = S/L; rewards are beta * P."""
    chosen = s.chosen_logps / s.chosen_lengths
    rejected = s.rejected_logps / s.rejected_lengths
    log_odds = (chosen - ops.log1mexp(chosen)) - (rejected - ops.log1mexp(rejected))
    return ops.mean(-chosen - beta * ops.log_sigmoid(log_odds)), beta * chosen, beta * rejected


@dataclass(frozen=True)
class Objective:
    """A named pair objective: its loss function, its hyperparameters and whether it needs R."""

    name: str
    fn: Callable[..., tuple[Any, Any, Any]]
    params: dict[str, float] = field(default_factory=dict)
    needs_reference: bool = False

    def __call__(self, ops: ArrayOps, stats: PairStats) -> tuple[Any, Any, Any]:
        return self.fn(ops, stats, **self.params)


# The one place for per-objective defaults: the paper's chosen hyperparameters for each objective
# (redi-spec.md §3.3, Table 2: REDI alpha 0.8 lr 1e-6; symmetric REDI, i.e. alpha 1, lr 2e-7; DPO beta 0.001
# lr 2e-7; SimPO beta 2, gamma 1, lr 5e-7). A run takes them for every key its config leaves unset.
PAPER_DEFAULTS: dict[str, dict[str, float]] = {
    # chosen_coef and the two negw gammas are the authors' code options at their recipe's values (redi-spec.md
    # §2.2): chosen coefficient 1, negative weighting off (gamma 0: weight exp(0) = 1).
    "redi": {"learning_rate": 1e-6, "alpha": 0.8, "chosen_coef": 1.0, "neg_weighting_gamma": 0.0,
             "neg_weighting_detached_gamma": 0.0},
    "symmetric": {"learning_rate": 2e-7},
    "dpo": {"learning_rate": 2e-7, "beta": 0.001},
    "simpo": {"learning_rate": 5e-7, "beta": 2.0, "gamma": 1.0},
}
# Hyperparameter names each objective accepts (symmetric's alpha is fixed at 1), with the paper's values.
OBJECTIVE_PARAMS: dict[str, dict[str, float]] = {
    name: {k: v for k, v in values.items() if k != "learning_rate"} for name, values in PAPER_DEFAULTS.items()
}
# Objectives outside the paper: TRL's defaults (stage 2's learning rate falls back to REDI's 1e-6, also TRL's).
OBJECTIVE_PARAMS["orpo"] = {"beta": 0.1}  # beta is ORPO's lambda (TRL's ORPOConfig.beta)
_FUNCTIONS = {"redi": redi_loss, "symmetric": symmetric_loss, "dpo": dpo_loss, "simpo": simpo_loss, "orpo": orpo_loss}
PAIR_OBJECTIVES = tuple(_FUNCTIONS)


def make_objective(name: str, **overrides: float) -> Objective:
    if name not in _FUNCTIONS:
        from redi.errors import UserError

        raise UserError(f"unknown objective '{name}'; choose one of: {', '.join(PAIR_OBJECTIVES)}")
    params = dict(OBJECTIVE_PARAMS[name])
    params.update({k: v for k, v in overrides.items() if k in params})
    return Objective(name, _FUNCTIONS[name], params, needs_reference=(name == "dpo"))
