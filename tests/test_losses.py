"""Loss semantics on hand-computed tiny cases (DESIGN.md, "Loss semantics")."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vaebench.losses import (bernoulli_nll, effective_beta, gaussian_nll, kl_anneal_weight, kl_per_dim, objective,
                             recon_nll)


def test_bernoulli_nll_without_gradients_agrees_with_the_fused_kernel() -> None:
    """The CPU's no-grad formula (evaluation, validation) is the fused BCE's value to float
    rounding, over the logits a model produces and beyond, binary and grey x alike; with a
    gradient to take, the fused kernel itself."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.linspace(-40, 40, 4001), torch.tensor([0.0, -0.0, 1e-8, -1e-8, 88.0, -88.0]),
                        torch.randn(20000, generator=gen) * 6])
    for x in (torch.rand(logits.shape, generator=gen).round(), torch.rand(logits.shape, generator=gen)):
        fused = F.binary_cross_entropy_with_logits(logits.double(), x.double(), reduction="none")
        with torch.no_grad():
            ours = bernoulli_nll(logits, x)
        assert ours.dtype == torch.float32 and ours.shape == logits.shape
        err = (ours.double() - fused).abs()
        assert err.max() <= 1e-6 + 1e-6 * fused.abs().max(), err.max()  # per pixel, to fp32
        # summed as a 784-pixel image is, it sits within fp32's own rounding of that sum
        assert (ours.double().sum() - fused.sum()).abs() <= 1e-6 * fused.sum()
    with torch.no_grad(), torch.profiler.profile() as prof:
        bernoulli_nll(logits, x)
    ops = {e.name for e in prof.events()}
    assert "aten::log_sigmoid_forward" not in ops and "aten::log_" in ops  # the written-out formula
    leaf = logits.clone().requires_grad_()
    out = bernoulli_nll(leaf, x)
    assert type(out.grad_fn).__name__.startswith("BinaryCrossEntropyWithLogits")
    out.sum().backward()
    assert torch.allclose(leaf.grad, torch.sigmoid(logits) - x, atol=1e-6)


def test_kl_closed_form_hand_computed() -> None:
    mean = torch.tensor([[0.0, 1.0]])
    logvar = torch.tensor([[0.0, math.log(4.0)]])
    # dim 0: N(0,1) vs N(0,1) -> 0; dim 1: 0.5 * (1 + 4 - 1 - ln 4)
    expected = torch.tensor([[0.0, 0.5 * (4.0 - math.log(4.0))]])
    assert torch.allclose(kl_per_dim(mean, logvar), expected)


def test_bernoulli_recon_is_summed_bce() -> None:
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])
    x = torch.tensor([[[[1.0, 0.0], [0.5, 1.0]]]])
    p = torch.sigmoid(logits)
    hand = -(x * p.log() + (1 - x) * (1 - p).log()).sum()
    assert torch.allclose(recon_nll(logits, x, "bernoulli"), hand.view(1), atol=1e-6)


def test_gaussian_unit_variance() -> None:
    logits = torch.zeros(1, 1, 1, 2)  # mean 0.5
    x = torch.tensor([[[[1.0, 0.5]]]])
    expected = 0.5 * torch.tensor([0.25, 0.0]) + 0.5 * math.log(2 * math.pi)
    assert torch.allclose(gaussian_nll(logits, x).flatten(), expected)
    # a learned log-sigma enters as log sigma + 0.5 ((x - mu) / sigma)^2
    ls = torch.tensor(math.log(0.5))
    assert torch.allclose(gaussian_nll(logits, x, ls).flatten(),
                          0.5 * torch.tensor([1.0, 0.0]) + math.log(0.5) + 0.5 * math.log(2 * math.pi))


def test_sum_vs_mean_reduction_and_effective_beta() -> None:
    torch.manual_seed(0)
    logits, x = torch.randn(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    mean, logvar = torch.randn(3, 5), torch.randn(3, 5)
    d = 16
    s = objective(logits, x, mean, logvar, likelihood="bernoulli", reduction="sum", beta=2.0)
    m = objective(logits, x, mean, logvar, likelihood="bernoulli", reduction="mean", beta=2.0)
    kl = kl_per_dim(mean, logvar).sum(1)
    bce_sum = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    assert torch.allclose(s.loss, bce_sum + 2.0 * kl)
    # mean reduction: BCE averaged over pixels, what F.binary_cross_entropy(reduction="mean") gives
    bce_mean = torch.stack([F.binary_cross_entropy_with_logits(logits[i], x[i]) for i in range(3)])
    assert torch.allclose(m.loss, bce_mean + 2.0 * kl)
    # ... which is the sum objective with KL weight beta * D, divided by D
    assert torch.allclose(m.loss * d, bce_sum + effective_beta(2.0, "mean", d) * kl)
    assert effective_beta(2.0, "sum", d) == 2.0 and effective_beta(2.0, "mean", d) == 32.0
    # recon and kl are reported in nats per image whatever the reduction
    assert torch.allclose(s.recon, m.recon) and torch.allclose(s.kl, m.kl)


def test_blog_recipe_effective_beta() -> None:
    # BCE-mean weighted by 50 with KL weight 1 == mean reduction with beta 1/50 -> D / 50
    assert effective_beta(1 / 50, "mean", 784) == pytest.approx(784 / 50)


def test_deterministic_model_has_no_kl() -> None:
    logits, x = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    t = objective(logits, x, torch.zeros(2, 3), None, likelihood="bernoulli", reduction="sum", beta=4.0)
    assert torch.equal(t.kl, torch.zeros(2)) and torch.allclose(t.loss, t.recon)


def test_kl_weight_scales_only_the_kl_term() -> None:
    logits, x = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    mean, logvar = torch.ones(1, 2), torch.zeros(1, 2)
    full = objective(logits, x, mean, logvar, likelihood="bernoulli", reduction="sum", beta=1.0)
    half = objective(logits, x, mean, logvar, likelihood="bernoulli", reduction="sum", beta=1.0, kl_weight=0.5)
    assert torch.allclose(full.loss - half.loss, 0.5 * full.kl)


@pytest.mark.parametrize("progress,expected", [(0.0, 0.0), (1.0, 0.25), (2.0, 0.5), (4.0, 1.0), (9.0, 1.0)])
def test_linear_warmup(progress: float, expected: float) -> None:
    assert kl_anneal_weight("linear", progress, epochs=4) == pytest.approx(expected)


def test_cyclical_schedule() -> None:
    # 2 cycles over 8 epochs, ramp over the first half of each 4-epoch cycle
    w = [kl_anneal_weight("cyclical", p, epochs=8, cycles=2, ratio=0.5) for p in [0, 1, 2, 3, 4, 5, 6, 8, 20]]
    assert w == pytest.approx([0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0, 1.0])


def test_no_schedule_is_constant_one() -> None:
    assert kl_anneal_weight("none", 0.0, epochs=10) == 1.0
    assert kl_anneal_weight("linear", 0.0, epochs=0) == 1.0
