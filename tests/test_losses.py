"""Routing losses against values computed by hand on small inputs."""

import math

import pytest
import torch

from fedmoe_app.config import LossConfig
from fedmoe_app.losses import heterogeneity_loss, heterogeneity_weight, load_balancing_loss, router_z_loss
from fedmoe_app.moe import RouterOutput
from fedmoe_app.methods.fft_moe import auxiliary_loss


def route(probs, index, logits=None, held=None):
    probs = torch.tensor(probs)
    index = torch.tensor(index)
    held = torch.ones(probs.shape[1], dtype=torch.bool) if held is None else torch.tensor(held)
    logits = torch.zeros_like(probs) if logits is None else torch.tensor(logits)
    return RouterOutput(logits, probs, index, torch.ones(index.shape), held)


def test_load_balancing_loss_by_hand():
    r = route([[.5, .3, .2], [.1, .6, .3], [.2, .2, .6], [.7, .2, .1]], [[0], [1], [2], [0]])
    # f = [2/4, 1/4, 1/4], P = [.375, .325, .3]; 3 * (.5*.375 + .25*.325 + .25*.3) = 1.03125
    assert load_balancing_loss(r).item() == pytest.approx(1.03125)


def test_load_balancing_loss_over_held_subset_and_top2():
    # M = 4, expert 2 not held; top-2 slots: tokens (0,1), (1,3) -> f = [1/4, 2/4, 0, 1/4]
    r = route([[.6, .4, 0, 0], [0, .5, 0, .5]], [[0, 1], [1, 3]], held=[True, True, False, True])
    # P = [.3, .45, 0, .25]; |S| = 3: 3 * (.25*.3 + .5*.45 + .25*.25) = 1.0875
    assert load_balancing_loss(r).item() == pytest.approx(1.0875)


def test_load_balancing_loss_is_one_when_uniform():
    r = route([[.25] * 4] * 4, [[0], [1], [2], [3]])
    assert load_balancing_loss(r).item() == pytest.approx(1.0)


def test_router_z_loss_by_hand():
    r = route([[.5, .5], [.75, .25]], [[0], [0]], logits=[[0.0, 0.0], [math.log(3), 0.0]])
    # logsumexp = ln 2 and ln 4 = 2 ln 2 -> mean of squares = 2.5 (ln 2)^2
    assert router_z_loss(r).item() == pytest.approx(2.5 * math.log(2) ** 2, rel=1e-6)


def test_heterogeneity_loss_by_hand():
    # client mean routing [.5, .5] over held {0, 1}; global usage [.1, .3, .6] -> restricted [.25, .75]
    r = route([[.5, .5, 0], [.5, .5, 0]], [[0], [1]], held=[True, True, False])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert heterogeneity_loss(r, torch.tensor([.1, .3, .6])).item() == pytest.approx(expected, rel=1e-5)


def test_heterogeneity_loss_is_zero_when_client_matches_global():
    r = route([[.2, .8], [.4, .6]], [[1], [1]])
    assert heterogeneity_loss(r, torch.tensor([.3, .7])).item() == pytest.approx(0.0, abs=1e-7)


def test_heterogeneity_weight_by_hand():
    assert heterogeneity_weight([10, 0, 0, 0], 4, 16) == pytest.approx(1.75)  # skew 1, 2 - 1/4
    assert heterogeneity_weight([5, 5, 5, 5], 4, 16) == pytest.approx(0.0)
    # two of four classes, evenly: skew = 1 - ln2/ln4 = 0.5; full budget -> 0.5 * 1
    assert heterogeneity_weight([3, 3, 0, 0], 16, 16) == pytest.approx(0.5)
    assert heterogeneity_weight([3, 3, 0, 0], 4, 16) > heterogeneity_weight([3, 3, 0, 0], 16, 16)


def test_auxiliary_loss_combines_coefficients_and_averages_layers():
    r1 = route([[.5, .3, .2], [.1, .6, .3], [.2, .2, .6], [.7, .2, .1]], [[0], [1], [2], [0]])
    r2 = route([[.25, .25, .5]] * 4, [[0], [1], [2], [2]], logits=[[0.0, 0.0, 0.0]] * 4)
    usage = torch.tensor([[1 / 3] * 3, [.25, .25, .5]])
    cfg = LossConfig(balance=0.1, heterogeneity=0.2, z_loss=0.3)
    bal = (1.03125 + load_balancing_loss(r2).item()) / 2
    het = (heterogeneity_loss(r1, usage[0]).item() + 0.0) / 2
    z = (router_z_loss(r1).item() + router_z_loss(r2).item()) / 2
    expected = 0.1 * bal + 0.2 * 1.5 * het + 0.3 * z
    assert auxiliary_loss([r1, r2], cfg, 1.5, usage).item() == pytest.approx(expected, rel=1e-5)
    off = LossConfig(balance=0.0, heterogeneity=0.0, z_loss=0.0)
    assert auxiliary_loss([r1, r2], off, 1.5, usage).item() == 0.0
