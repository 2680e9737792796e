"""The objectives against hand-derived values, the official code's conventions, and autograd."""

import math

import pytest
import torch

import symmpo_fast as sf
from symmpo_fast.objectives import TERMS, loss_pass_reference, preference_terms


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def test_roles_and_presets_match_the_official_code():
    assert sf.ROLES == ("chosen", "rejected", "pair_rejected", "contrast_rejected", "contrast_chosen")
    s = sf.ObjectiveConfig.symmpo()
    assert (s.beta, s.dpo_weight, s.pair_weight, s.margin_weight, s.anchor_weight, s.anchor_delta) == (
        0.1, 1.0, 0.5, 1e-4, 1.0, 0.0)
    assert s.anchor_contrast and s.copo_weight == 0 and not s.average_logps
    assert s.used_columns == (0, 1, 2, 3, 4)
    m = sf.ObjectiveConfig.mdpo()
    assert (m.beta, m.dpo_weight, m.copo_weight, m.anchor_weight, m.pair_weight, m.margin_weight) == (
        0.1, 1.0, 1.0, 1.0, 0, 0)
    assert not m.anchor_contrast and m.used_columns == (0, 1, 3)
    d = sf.ObjectiveConfig.dpo()
    assert d.beta == 0.1 and d.used_columns == (0, 1)
    assert sf.ObjectiveConfig.preset("mdpo", beta=0.2).beta == 0.2
    with pytest.raises(dataclasses_frozen_error()):
        s.beta = 1.0


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize("bad", [dict(beta=0), dict(beta=float("nan")), dict(pair_weight=-1),
                                 dict(anchor_contrast=1), dict(dpo_weight=0), dict(beta="0.1")])
def test_config_rejects_bad_values(bad):
    with pytest.raises((ValueError, TypeError)):
        sf.ObjectiveConfig(**bad)
    with pytest.raises(ValueError):
        sf.ObjectiveConfig.preset("ipo")


def _one_record():
    policy = torch.tensor([[-10.0, -14.0, -13.0, -12.5, -9.0]], dtype=torch.float64)
    ref = torch.tensor([[-11.0, -12.0, -12.0, -11.0, -10.5]], dtype=torch.float64)
    return policy, ref


def test_each_term_against_a_hand_derived_value():
    policy, ref = _one_record()
    lr = [p - r for p, r in zip(policy[0].tolist(), ref[0].tolist())]  # [1, -2, -1, -1.5, 1.5]
    beta, delta = 0.3, 0.05
    cfg = sf.ObjectiveConfig(beta=beta, dpo_weight=1, copo_weight=1, pair_weight=1, margin_weight=1,
                             anchor_weight=1, anchor_delta=delta, anchor_contrast=True)
    terms = preference_terms(policy, ref, cfg)[0].tolist()
    r = [beta * v for v in lr]
    expect = [
        -logsig(r[0] - r[1]),
        -logsig(r[0] - r[3]),
        -logsig(r[0] - r[2]) - logsig(r[4] - r[3]),
        ((lr[0] - lr[2]) - (lr[4] - lr[3])) ** 2,
        -logsig(r[0] - delta) - logsig(r[4] - delta),
    ]
    assert terms == pytest.approx(expect, rel=1e-12)
    # The margin term is on un-scaled log-ratios: (1 - -1) - (1.5 - -1.5) = -1 -> 1.
    assert terms[3] == pytest.approx(1.0)


def test_symmpo_loss_equals_the_official_formula():
    policy, ref = _one_record()
    loss, metrics = sf.preference_loss(policy, ref, sf.ObjectiveConfig.symmpo())
    p, q = policy[0].tolist(), ref[0].tolist()
    b = 0.1
    logits = (p[0] - p[1]) - (q[0] - q[1])
    logits_1 = (p[0] - p[2]) - (q[0] - q[2])
    logits_2 = (p[4] - p[3]) - (q[4] - q[3])
    expect = (-logsig(b * logits) + 0.5 * (-logsig(b * logits_1) - logsig(b * logits_2))
              - logsig(b * (p[0] - q[0])) - logsig(b * (p[4] - q[4])) + 1e-4 * (logits_1 - logits_2) ** 2)
    assert loss.item() == pytest.approx(expect, rel=1e-12)
    assert metrics["loss"].item() == pytest.approx(expect, rel=1e-12)
    assert metrics["rewards/chosen"].item() == pytest.approx(b * (p[0] - q[0]))
    assert metrics["accuracy/dpo"].item() == 1.0  # r_w = 0.1 > r_l = -0.2
    assert metrics["accuracy/pair_m"].item() == 1.0
    assert metrics["accuracy/pair_contrast"].item() == 1.0
    assert metrics["margin/dpo"].item() == pytest.approx(b * logits)


def test_mdpo_and_dpo_equal_their_formulas():
    policy, ref = _one_record()
    p, q = policy[0].tolist(), ref[0].tolist()
    b = 0.1
    dpo = -logsig(b * ((p[0] - p[1]) - (q[0] - q[1])))
    copo = -logsig(b * ((p[0] - p[3]) - (q[0] - q[3])))
    anchor = -logsig(b * (p[0] - q[0]))
    assert sf.preference_loss(policy, ref, sf.ObjectiveConfig.mdpo())[0].item() == pytest.approx(dpo + copo + anchor)
    assert sf.preference_loss(policy, ref, sf.ObjectiveConfig.dpo())[0].item() == pytest.approx(dpo)


@pytest.mark.parametrize("term", TERMS)
def test_zero_weight_removes_exactly_that_term(term):
    torch.manual_seed(0)
    policy, ref = torch.randn(6, 5, dtype=torch.float64) * 5, torch.randn(6, 5, dtype=torch.float64) * 5
    full = sf.ObjectiveConfig(dpo_weight=1, copo_weight=0.7, pair_weight=0.5, margin_weight=0.3, anchor_weight=0.9,
                              anchor_delta=0.1, anchor_contrast=True)
    without = sf.ObjectiveConfig(**{**full.__dict__, f"{term}_weight": 0.0})
    terms = preference_terms(policy, ref, full)
    i = TERMS.index(term)
    expect = sf.preference_loss(policy, ref, full)[0] - full.weights[i] * terms[:, i].mean()
    got, metrics = sf.preference_loss(policy, ref, without)
    assert got.item() == pytest.approx(expect.item(), rel=1e-12)
    assert f"loss/{term}" not in metrics
    assert terms[:, i].abs().sum() > 0  # the removed term was not zero to begin with


@pytest.mark.parametrize("preset,unused", [("dpo", [2, 3, 4]), ("mdpo", [2, 4])])
def test_unused_columns_are_never_read(preset, unused):
    torch.manual_seed(1)
    cfg = sf.ObjectiveConfig.preset(preset)
    policy = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(4, 5, dtype=torch.float64)
    clean_loss, clean_metrics = sf.preference_loss(policy, ref, cfg)
    poisoned_p, poisoned_r = policy.detach().clone(), ref.clone()
    poisoned_p[:, unused] = float("nan")
    poisoned_r[:, unused] = float("nan")
    poisoned_p.requires_grad_(True)
    loss, metrics = sf.preference_loss(poisoned_p, poisoned_r, cfg)
    assert loss.item() == clean_loss.item()
    assert all(torch.isfinite(v) for v in metrics.values())
    (g,) = torch.autograd.grad(loss, poisoned_p)
    assert torch.isfinite(g).all() and (g[:, unused] == 0).all()


def test_gradcheck_float64():
    torch.manual_seed(2)
    cfg = sf.ObjectiveConfig(dpo_weight=1, copo_weight=0.3, pair_weight=0.5, margin_weight=0.2, anchor_weight=1,
                             anchor_delta=0.2, anchor_contrast=True, beta=0.7)
    policy = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, r: sf.preference_loss(p, r, cfg)[0], (policy, ref))


@pytest.mark.parametrize("preset", ["symmpo", "mdpo", "dpo"])
def test_loss_pass_reference_is_the_gradient_of_the_summed_loss(preset):
    torch.manual_seed(3)
    cfg = sf.ObjectiveConfig.preset(preset)
    policy = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(7, 5, dtype=torch.float64)
    terms, grad = loss_pass_reference(policy, ref, cfg)
    loss, _ = sf.preference_loss(policy, ref, cfg)
    (g,) = torch.autograd.grad(loss * policy.shape[0], policy)
    torch.testing.assert_close(grad, g)
    torch.testing.assert_close(terms, preference_terms(policy, ref, cfg).detach())


def test_swapping_chosen_and_rejected_changes_the_loss():
    # Guards the equality tests above against a loss that ignores its inputs.
    policy, ref = _one_record()
    cfg = sf.ObjectiveConfig.symmpo()
    swapped = policy[:, [1, 0, 2, 3, 4]]
    assert sf.preference_loss(swapped, ref, cfg)[0].item() != pytest.approx(sf.preference_loss(policy, ref, cfg)[0].item())


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"\[B, 5\]"):
        sf.preference_loss(torch.zeros(3, 4), torch.zeros(3, 4), sf.ObjectiveConfig.dpo())
    with pytest.raises(ValueError, match="shape"):
        sf.preference_loss(torch.zeros(3, 5), torch.zeros(2, 5), sf.ObjectiveConfig.dpo())
    with pytest.raises(ValueError, match="at least one record"):
        sf.preference_loss(torch.zeros(0, 5), torch.zeros(0, 5), sf.ObjectiveConfig.dpo())
