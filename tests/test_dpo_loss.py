"""Diffusion-DPO against hand-computed values."""

import math

import pytest
import torch

from diffalign.config import ObjectiveConfig
from diffalign.objectives.base import PairErrors
from diffalign.objectives.dpo import DPO, dpo_loss
from diffalign.registry import build_objective

# Pair 1: the policy lowered the winner's error by 0.02 relative to the loser, the reference did not.
# Pair 2: the opposite. With beta = 10: inside = -(10/2) * (model_diff - ref_diff) = +0.1 and -0.1.
MODEL_W = torch.tensor([0.10, 0.20])
MODEL_L = torch.tensor([0.12, 0.18])
REF_W = torch.tensor([0.11, 0.20])
REF_L = torch.tensor([0.11, 0.20])


def test_sigmoid_loss_matches_hand_computation():
    loss, metrics = dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, beta=10.0)
    # -logsigmoid(x) = log(1 + exp(-x))
    expected = (math.log1p(math.exp(-0.1)) + math.log1p(math.exp(0.1))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["implicit_acc"] == pytest.approx(0.5)
    assert metrics["margin"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["err_policy_w"] == pytest.approx(0.15)


def test_mean_is_taken_after_logsigmoid():
    w, l = torch.tensor([0.1, 0.3]), torch.tensor([0.3, 0.1])
    zero = torch.zeros(2)
    loss, _ = dpo_loss(w, l, zero, zero, beta=10.0)
    inside = -5.0 * (w - l)  # [+1, -1]
    assert loss.item() == pytest.approx((-torch.nn.functional.logsigmoid(inside)).mean().item(), rel=1e-6)
    assert loss.item() != pytest.approx(math.log(2), rel=1e-3)  # -logsigmoid(mean(inside)) would be log 2


def test_hinge_and_ipo_match_hand_computation():
    # h = (ref_w - ref_l) - (model_w - model_l) = [+0.02, -0.02]
    hinge, _ = dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, beta=10.0, loss_type="hinge")
    assert hinge.item() == pytest.approx((0.8 + 1.2) / 2, rel=1e-5)
    ipo, _ = dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, beta=10.0, loss_type="ipo")
    assert ipo.item() == pytest.approx(((0.02 - 0.05) ** 2 + (-0.02 - 0.05) ** 2) / 2, rel=1e-4)


def test_implicit_accuracy_counts_ties_as_half():
    e = torch.tensor([0.5, 0.5, 0.5])
    _, metrics = dpo_loss(e, e, e, e)
    assert metrics["implicit_acc"] == 0.5
    _, metrics = dpo_loss(torch.tensor([0.1, 0.5, 0.2]), torch.tensor([0.2, 0.5, 0.1]), e, e)
    assert metrics["implicit_acc"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_gradient_pushes_winner_error_down_and_loser_error_up():
    w, l = torch.tensor([0.3], requires_grad=True), torch.tensor([0.3], requires_grad=True)
    loss, _ = dpo_loss(w, l, torch.tensor([0.3]), torch.tensor([0.3]), beta=5000.0)
    loss.backward()
    assert w.grad.item() > 0 and l.grad.item() < 0
    assert w.grad.item() == pytest.approx(5000.0 / 4)  # d/dw -logsigmoid(-(b/2)(w-l)) at 0 = b/2 * 1/2


def test_objective_from_registry_and_bad_names():
    obj = build_objective(ObjectiveConfig(name="dpo", beta=10.0))
    assert isinstance(obj, DPO) and obj.needs_reference and obj.noising == "forward"
    loss, _ = obj(PairErrors(MODEL_W, MODEL_L, REF_W, REF_L))
    assert loss.item() == pytest.approx(dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, beta=10.0)[0].item())
    with pytest.raises(KeyError, match="unknown objective 'dpoo'.*dpo"):
        build_objective(ObjectiveConfig(name="dpoo"))
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, loss_type="square")
