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
    assert make_objective("redi").params == {"alpha": 0.8, "chosen_coef": 1.0, "neg_weighting_gamma": 0.0,
                                             "neg_weighting_detached_gamma": 0.0}
    assert make_objective("dpo").params == {"beta": 0.001} and make_objective("dpo").needs_reference
    assert make_objective("simpo", beta=10.0, gamma=5.0).params == {"beta": 10.0, "gamma": 5.0}
    assert make_objective("redi", alpha=0.5, beta=3.0).params["alpha"] == 0.5
    assert "beta" not in make_objective("redi", alpha=0.5, beta=3.0).params


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


def test_pair_stats_read_the_chosen_then_rejected_layout_once():
    # A micro-batch of 2 pairs: S and L of chosen 0, chosen 1, rejected 0, rejected 1; R likewise.
    s = PairStats.from_halves(np.array([-1.0, -2.0, -3.0, -4.0]), np.array([1.0, 2.0, 3.0, 4.0]),
                              np.array([-5.0, -6.0, -7.0, -8.0]))
    assert s.chosen_logps.tolist() == [-1.0, -2.0] and s.rejected_lengths.tolist() == [3.0, 4.0]
    assert s.ref_chosen_logps.tolist() == [-5.0, -6.0] and s.ref_rejected_logps.tolist() == [-7.0, -8.0]
    # A step of two micro-batches: every chosen first, in micro-batch order; no reference stays None.
    step = PairStats.concatenate([PairStats.from_halves(np.array([-1.0, -3.0]), np.array([1.0, 3.0])),
                                  PairStats.from_halves(np.array([-2.0, -4.0]), np.array([2.0, 4.0]))])
    assert step.chosen_logps.tolist() == [-1.0, -2.0] and step.rejected_logps.tolist() == [-3.0, -4.0]
    assert step.ref_chosen_logps is None


# ------------------------------------------------------------------ REDI's chosen coefficient and negative weighting


def test_redi_chosen_coef_and_neg_weighting_hand_computed():
    # P = S/L: chosen -1, -2; rejected -1, -3. Weight w = exp(gamma * P_l).
    # gamma 1, c_w 1, alpha 0.8: pair 1: 1 + 0.8 * (-1) * e^-1 = 1 - 0.8 * 0.36787944 = 0.70569645
    #                             pair 2: 2 + 0.8 * (-3) * e^-3 = 2 - 2.4 * 0.04978707 = 1.88051104 ; mean 1.29310374
    loss, chosen, rejected = redi_loss(np_ops, STATS, alpha=0.8, neg_weighting_gamma=1.0)
    assert loss == pytest.approx(1.29310374, abs=1e-8)
    np.testing.assert_allclose(rejected, [-1.0, -3.0])  # the logged rewards stay P, unweighted
    # c_w 0.5, detached gamma 2: pair 1: 0.5 - 0.8 * e^-2 = 0.5 - 0.8 * 0.13533528 = 0.39173177
    #                            pair 2: 1 - 2.4 * e^-6 = 1 - 2.4 * 0.00247875 = 0.99405099 ; mean 0.69289138
    loss = redi_loss(np_ops, STATS, alpha=0.8, chosen_coef=0.5, neg_weighting_detached_gamma=2.0)[0]
    assert loss == pytest.approx(0.69289138, abs=1e-8)
    # gamma 0 is the paper's loss exactly; both gammas at once is refused
    assert redi_loss(np_ops, STATS, neg_weighting_gamma=0.0)[0] == redi_loss(np_ops, STATS)[0]
    with pytest.raises(ValueError, match="set only one"):
        redi_loss(np_ops, STATS, neg_weighting_gamma=1.0, neg_weighting_detached_gamma=1.0)


def authors_reinforce_loss(torch, chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *,
                           reinforce_chosen_coef, reinforce_rejected_coef, use_neg_weighting, neg_weighting_gamma):
    """The authors' formula, transcribed from Tim-Siu/reinforcement-distillation
    trl/trl/trainer/dpo2_trainer.py, DPOTrainer.dpo_loss, the ``elif self.loss_type == "reinforce":`` branch
    (lines 1128-1155 at dda07d2, redi-spec.md §2.2; negw at lines 1147-1151), then ``losses.mean()`` as
    get_batch_loss_metrics returns it. Field names and defaults: trl/trl/trainer/dpo2_config.py
    (reinforce_chosen_coef, reinforce_rejected_coef, use_neg_weighting, neg_weighting_gamma)."""
    safe_chosen_lengths = torch.clamp(chosen_lengths, min=1.0)
    safe_rejected_lengths = torch.clamp(rejected_lengths, min=1.0)
    normalized_chosen_logps = chosen_logps / safe_chosen_lengths
    normalized_rejected_logps = rejected_logps / safe_rejected_lengths
    loss_chosen = -reinforce_chosen_coef * normalized_chosen_logps
    loss_rejected = reinforce_rejected_coef * normalized_rejected_logps
    if use_neg_weighting:
        neg_weights = torch.exp(neg_weighting_gamma * normalized_rejected_logps)
        loss_rejected = loss_rejected * neg_weights
    losses = loss_chosen + loss_rejected
    return losses.mean()


CASES = [  # (S_w, L_w, S_l, L_l) per pair, c_w, alpha, gamma
    (([-2.0, -6.0, -0.3], [2.0, 3.0, 1.0], [-4.0, -3.0, -9.0], [4.0, 1.0, 5.0]), 1.0, 0.8, 1.0),
    (([-12.5, -0.1], [7.0, 2.0], [-0.5, -40.0], [3.0, 11.0]), 0.7, 0.5, 2.5),
]


@pytest.mark.parametrize("case", CASES)
def test_redi_neg_weighting_equals_the_authors_formula_values_and_gradients(case):
    torch = pytest.importorskip("torch")
    from redi.backends.torch_cuda.backend import TorchOps

    (sw, lw, sl, ll), c_w, alpha, gamma = case
    for use in (False, True):
        ours_in = [torch.tensor(x, dtype=torch.float64, requires_grad=i in (0, 2)) for i, x in enumerate((sw, lw, sl, ll))]
        theirs_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in ours_in]
        ours = redi_loss(TorchOps(torch.device("cpu")), PairStats(*ours_in), alpha=alpha, chosen_coef=c_w,
                         neg_weighting_gamma=gamma if use else 0.0)[0]
        theirs = authors_reinforce_loss(torch, theirs_in[0], theirs_in[2], theirs_in[1], theirs_in[3],
                                        reinforce_chosen_coef=c_w, reinforce_rejected_coef=alpha,
                                        use_neg_weighting=use, neg_weighting_gamma=gamma)
        assert ours.item() == pytest.approx(theirs.item(), abs=1e-12)
        ours.backward()
        theirs.backward()
        for mine, ref in ((ours_in[0], theirs_in[0]), (ours_in[2], theirs_in[2])):
            np.testing.assert_allclose(mine.grad.numpy(), ref.grad.numpy(), atol=1e-12)


@pytest.mark.parametrize("detached", [False, True])
def test_redi_neg_weighting_gradient_matches_the_closed_form_and_finite_differences(detached):
    torch = pytest.importorskip("torch")
    from redi.backends.torch_cuda.backend import TorchOps

    sw, lw, sl, ll = (np.array(x) for x in CASES[0][0])
    c_w, alpha, gamma, n = 0.9, 0.8, 1.5, len(sw)
    key = "neg_weighting_detached_gamma" if detached else "neg_weighting_gamma"
    params = {"alpha": alpha, "chosen_coef": c_w, key: gamma}
    s_w, s_l = torch.tensor(sw, requires_grad=True), torch.tensor(sl, requires_grad=True)
    redi_loss(TorchOps(torch.device("cpu")), PairStats(s_w, torch.tensor(lw), s_l, torch.tensor(ll)), **params)[0].backward()
    # d/dS_w = -c_w / (n L_w). d/dS_l of alpha * P e^{gamma P} / n, P = S_l/L_l: alpha e^{gamma P} (1 + gamma P) / (n L_l)
    # with the gradient through the weight (the authors'), alpha e^{gamma P} / (n L_l) with it detached.
    p_l = sl / ll
    through = 1.0 if detached else 1.0 + gamma * p_l
    np.testing.assert_allclose(s_w.grad.numpy(), -c_w / (n * lw), rtol=1e-12)
    np.testing.assert_allclose(s_l.grad.numpy(), alpha * np.exp(gamma * p_l) * through / (n * ll), rtol=1e-12)
    if not detached:  # finite differences of the numpy loss agree (the detached one has no such counterpart)
        h = 1e-6
        for i in range(n):
            up, down = sl.copy(), sl.copy()
            up[i] += h
            down[i] -= h
            f = [redi_loss(np_ops, PairStats(sw, lw, x, ll), **params)[0] for x in (up, down)]
            assert (f[0] - f[1]) / (2 * h) == pytest.approx(float(s_l.grad[i]), rel=1e-6)
    # Below P_l = -1/gamma the authors' weighted term pushes the rejected log-prob *up* (gradient sign flips).
    assert (s_l.grad.numpy()[p_l < -1 / gamma] > 0).all() == detached


def test_authors_names_are_aliases_in_files_and_set(tmp_path):
    from redi.config import apply_overrides, load_config, objective_line, validate

    cfg = validate(apply_overrides(load_config(None), ["reinforce_chosen_coef=0.9", "reinforce_rejected_coef=0.5"]))
    assert (cfg.chosen_coef, cfg.alpha) == (0.9, 0.5)
    assert "chosen_coef 0.9 (paper: 1)" in objective_line(cfg) and "alpha 0.5 (paper: 0.8)" in objective_line(cfg)
    # The paper's values: the run's line stays as before (chosen_coef and negw shown only when changed).
    assert objective_line(validate(load_config(None))) == "objective redi: lr 1e-06, alpha 0.8"
    # use_neg_weighting, the authors' switch: false means off whatever gamma says, in either order, as in their
    # trainer; true alone takes their default gamma 1; a gamma redi is given turns the weighting on by itself.
    for text, gamma in [("use_neg_weighting: false\nneg_weighting_gamma: 2.0\n", 0.0),
                        ("neg_weighting_gamma: 2.0\nuse_neg_weighting: false\n", 0.0),
                        ("use_neg_weighting: true\nneg_weighting_gamma: 2.0\n", 2.0),
                        ("use_neg_weighting: true\n", 1.0), ("neg_weighting_gamma: 0.5\n", 0.5)]:
        (tmp_path / "c.yaml").write_text(text)
        assert validate(load_config(tmp_path / "c.yaml")).neg_weighting_gamma == gamma, text
    sets = ["use_neg_weighting=false", "neg_weighting_gamma=3"]
    assert validate(apply_overrides(load_config(None), sets)).neg_weighting_gamma == 0.0


def test_both_negative_weightings_at_once_are_refused():
    from redi.config import apply_overrides, load_config, validate
    from redi.errors import UserError

    with pytest.raises(UserError, match="'neg_weighting_gamma' and 'neg_weighting_detached_gamma' are two variants"):
        validate(apply_overrides(load_config(None), ["neg_weighting_gamma=1", "neg_weighting_detached_gamma=1"]))
