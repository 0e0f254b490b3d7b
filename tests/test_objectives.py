"""Objectives against hand-computed values and the paper's equations (Xu et al., Eq. 1-5)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from redi.objectives import NumpyOps as np_ops
from redi.objectives import (PairStats, dpo_loss, make_objective, orpo_loss, redi_loss, sft_loss, simpo_loss,
                             symmetric_loss)

# Two pairs. Chosen: S = -2 over 2 tokens, -6 over 3. Rejected: S = -4 over 4, -3 over 1.
STATS = PairStats(
    chosen_logps=np.array([-2.0, -6.0]), chosen_lengths=np.array([2.0, 3.0]),
    rejected_logps=np.array([-4.0, -3.0]), rejected_lengths=np.array([4.0, 1.0]),
)


def test_redi_hand_computed():
    # pair 1: -(-1) + 0.8 * (-1) = 0.2 ; pair 2: -(-2) + 0.8 * (-3) = -0.4 ; mean = -0.1
    loss, chosen, rejected = redi_loss(np_ops, STATS, alpha=0.8)
    assert loss == pytest.approx(-0.1)
    np.testing.assert_allclose(chosen, [-1.0, -2.0])
    np.testing.assert_allclose(rejected, [-1.0, -3.0])


def test_orpo_hand_computed():
    # P = S/L: chosen -1, -2; rejected -1, -3. log odds(P) = P - log(1 - e^P):
    #   P=-1: -1 - log(0.63212056) = -0.54132485 ; P=-2: -2 - log(0.86466472) = -1.85458655
    #   P=-3: -3 - log(0.95021293) = -2.94893082
    # pair 1: 1 + 0.1 * -log sigmoid(0) = 1 + 0.1 * 0.69314718 = 1.06931472
    # pair 2: 2 + 0.1 * -log sigmoid(1.09434428) = 2 + 0.1 * 0.28875078 = 2.02887508 ; mean 1.54909490
    loss, chosen, rejected = orpo_loss(np_ops, STATS, beta=0.1)
    assert loss == pytest.approx(1.54909490, abs=1e-7)
    np.testing.assert_allclose(chosen, [-0.1, -0.2])
    np.testing.assert_allclose(rejected, [-0.1, -0.3])


def test_orpo_matches_trls_formula():
    # TRL's ORPOTrainer.odds_ratio_loss on average log-probs, with its policy NLL as the chosen per-token NLL.
    for cw, cl, rw, rl in [(-3.0, 7.0, -9.0, 4.0), (-0.2, 5.0, -0.1, 2.0)]:
        pc, pr = cw / cl, rw / rl
        log_odds = (pc - pr) - (math.log1p(-math.exp(pc)) - math.log1p(-math.exp(pr)))
        want = -pc - 0.25 * math.log(1 / (1 + math.exp(-log_odds)))
        s = PairStats(np.array([cw]), np.array([cl]), np.array([rw]), np.array([rl]))
        assert make_objective("orpo", beta=0.25)(np_ops, s)[0] == pytest.approx(want, rel=1e-12)


def test_redi_alpha_zero_is_length_normalised_chosen_nll():
    loss, _, _ = redi_loss(np_ops, STATS, alpha=0.0)
    # per-sequence normalisation then an equal-weight mean over pairs: (1 + 2) / 2, not 8 / 5 tokens
    assert loss == pytest.approx(1.5)


def test_symmetric_is_redi_at_alpha_one():
    assert symmetric_loss(np_ops, STATS)[0] == pytest.approx(redi_loss(np_ops, STATS, alpha=1.0)[0])
    assert symmetric_loss(np_ops, STATS)[0] == pytest.approx(((1 - 1) + (2 - 3)) / 2)


def test_dpo_equals_log2_when_policy_is_reference():
    s = PairStats(STATS.chosen_logps, STATS.chosen_lengths, STATS.rejected_logps, STATS.rejected_lengths,
                  ref_chosen_logps=STATS.chosen_logps.copy(), ref_rejected_logps=STATS.rejected_logps.copy())
    assert dpo_loss(np_ops, s, beta=0.001)[0] == pytest.approx(math.log(2))


def test_dpo_uses_summed_logps():
    s = PairStats(np.array([-10.0]), np.array([100.0]), np.array([-20.0]), np.array([1.0]),
                  np.array([-12.0]), np.array([-19.0]))
    # beta * [(-10 + 12) - (-20 + 19)] = 0.5 * 3 = 1.5 ; lengths play no part
    assert dpo_loss(np_ops, s, beta=0.5)[0] == pytest.approx(math.log1p(math.exp(-1.5)))


def test_simpo_margin_sign_and_value():
    loss, rc, rr = simpo_loss(np_ops, STATS, beta=2.0, gamma=1.0)
    # margins: 2 * (-1 - -1) - 1 = -1 ; 2 * (-2 - -3) - 1 = 1
    expected = np.mean([math.log1p(math.exp(1.0)), math.log1p(math.exp(-1.0))])
    assert loss == pytest.approx(expected)
    good = PairStats(np.array([-1.0]), np.array([1.0]), np.array([-5.0]), np.array([1.0]))
    bad = PairStats(np.array([-5.0]), np.array([1.0]), np.array([-1.0]), np.array([1.0]))
    assert simpo_loss(np_ops, good)[0] < math.log(2) < simpo_loss(np_ops, bad)[0]


def test_sft_is_token_level_mean():
    assert sft_loss(np_ops, np.array([-2.0, -6.0]), np.array([2.0, 3.0])) == pytest.approx(8 / 5)


def test_make_objective_defaults_and_overrides():
    assert make_objective("redi").params == {"alpha": 0.8}
    assert make_objective("dpo").params == {"beta": 0.001} and make_objective("dpo").needs_reference
    assert make_objective("simpo", beta=10.0, gamma=5.0).params == {"beta": 10.0, "gamma": 5.0}
    assert make_objective("redi", alpha=0.5, beta=3.0).params == {"alpha": 0.5}


def test_torch_ops_match_numpy():
    torch = pytest.importorskip("torch")
    from redi.backends.torch_cuda.backend import TorchOps

    ops = TorchOps(torch.device("cpu"))
    t = PairStats(*(torch.tensor(x, dtype=torch.float64) for x in
                    (STATS.chosen_logps, STATS.chosen_lengths, STATS.rejected_logps, STATS.rejected_lengths)),
                  torch.tensor([-1.0, -7.0], dtype=torch.float64), torch.tensor([-5.0, -2.0], dtype=torch.float64))
    n = PairStats(STATS.chosen_logps, STATS.chosen_lengths, STATS.rejected_logps, STATS.rejected_lengths,
                  np.array([-1.0, -7.0]), np.array([-5.0, -2.0]))
    for name in ("redi", "symmetric", "dpo", "simpo", "orpo"):
        obj = make_objective(name, beta=0.7) if name in ("dpo", "simpo") else make_objective(name)
        assert float(obj(ops, t)[0]) == pytest.approx(float(obj(np_ops, n)[0]), abs=1e-12)
