"""Likelihoods, closed-form KL, reductions, beta and KL annealing: pure functions.

For one image x with D pixel values and a latent of size K (see DESIGN.md, "Loss semantics"):

  sum  reduction: loss(x) = sum_d -log p(x_d|z) + beta * sum_k KL_k        (beta=1: -ELBO, nats)
  mean reduction: loss(x) = mean_d -log p(x_d|z) + beta * sum_k KL_k
                  = (1/D) * [sum_d -log p(x_d|z) + (beta*D) * sum_k KL_k]

so a `mean` run optimises the `sum` objective (up to the constant 1/D) with the KL weight beta*D:
its *effective beta*. The batch loss is the mean over the batch in both cases.

The reconstruction and KL terms are returned per sample (shape (B,)) in nats per image whatever the
reduction, so that they compare across runs; only `loss` carries the run's own reduction.

`weighted_objective` is the same objective with the reduction and beta already turned into the two
weights it applies (recon_scale = 1 or 1/D, kl_coef = beta * annealing factor); they may be tensors,
which is how one call under `torch.func.vmap` trains every member of a packed group with its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)


def bernoulli_nll(logits: Tensor, x: Tensor, log_sigma: Tensor | None = None) -> Tensor:
    """-log Bernoulli(x | sigmoid(logits)) per pixel, (B, C, H, W); x in [0, 1].
    Computed on logits for stability (pytorch/examples vae/main.py uses BCE on probabilities)."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none")


def gaussian_nll(logits: Tensor, x: Tensor, log_sigma: Tensor | None = None) -> Tensor:
    """-log N(x | sigmoid(logits), sigma^2) per pixel, (B, C, H, W). With sigma = 1 this is
    0.5 * (x - mean)^2 + 0.5 * log(2 pi)."""
    mean = torch.sigmoid(logits)
    log_sigma = logits.new_zeros(()) if log_sigma is None else log_sigma
    return 0.5 * ((x - mean) * torch.exp(-log_sigma)) ** 2 + log_sigma + 0.5 * LOG_2PI


LIKELIHOODS = {"bernoulli": bernoulli_nll, "gaussian": gaussian_nll}


class LikelihoodMix(NamedTuple):
    """Several likelihoods in one call: each sample set uses `names[index]` (a packed group whose
    members differ in likelihood; under vmap `index` is each member's own)."""

    names: tuple[str, ...]
    index: Tensor  # () int64


Likelihood = Union[str, LikelihoodMix]


def recon_nll(logits: Tensor, x: Tensor, likelihood: Likelihood, log_sigma: Tensor | None = None) -> Tensor:
    """Reconstruction term summed over the D pixel values: -log p(x|z) in nats per image, (B,)."""
    if isinstance(likelihood, LikelihoodMix):
        each = torch.stack([recon_nll(logits, x, name, log_sigma) for name in likelihood.names])  # (L, B)
        return each.gather(0, likelihood.index.expand(1, each.shape[1])).squeeze(0)
    return LIKELIHOODS[likelihood](logits, x, log_sigma).flatten(1).sum(1)


def kl_per_dim(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per latent dim, (B, K) (Kingma & Welling 2014, app. B)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


def log_normal_std(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last dim."""
    return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)


def log_normal_diag(z: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mean, diag(exp(logvar))) summed over the last dim."""
    return -0.5 * ((z - mean).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


def reduction_scale(reduction: str, num_pixels: int) -> float:
    """The weight of the summed reconstruction term: 1 for `sum`, 1/D for `mean`."""
    return 1.0 / num_pixels if reduction == "mean" else 1.0


def effective_beta(beta: float, reduction: str, num_pixels: int) -> float:
    """The KL weight of the equivalent `sum`-reduction objective."""
    return beta * num_pixels if reduction == "mean" else beta


def kl_anneal_weight(schedule: str, progress: float, epochs: int = 0, cycles: int = 4,
                     ratio: float = 0.5) -> float:
    """Factor in [0, 1] multiplying the KL weight at `progress` epochs into training (fractional:
    epoch index + fraction of the epoch done)."""
    if schedule == "none" or epochs <= 0:
        return 1.0
    if schedule == "linear":
        return min(1.0, progress / epochs)
    if schedule == "cyclical":
        # Fu et al. 2019: `cycles` cycles over `epochs` epochs, ramp up over `ratio` of each cycle.
        if progress >= epochs:
            return 1.0
        period = epochs / cycles
        return min(1.0, (progress % period) / (period * ratio))
    raise ValueError(f"unknown KL annealing schedule {schedule!r}")


@dataclass
class LossTerms:
    loss: Tensor   # (B,) the training objective under the run's reduction and KL weight
    recon: Tensor  # (B,) -log p(x|z) summed over pixels, nats per image
    kl: Tensor     # (B,) KL summed over latent dims, nats per image (zeros for deterministic models)


def objective(logits: Tensor, x: Tensor, mean: Tensor, logvar: Tensor | None, *, likelihood: str,
              reduction: str, beta: float, kl_weight: float = 1.0,
              log_sigma: Tensor | None = None) -> LossTerms:
    """Per-sample loss terms; the batch loss is `terms.loss.mean()`."""
    return weighted_objective(logits, x, mean, logvar, likelihood=likelihood, log_sigma=log_sigma,
                              recon_scale=reduction_scale(reduction, x[0].numel()), kl_coef=beta * kl_weight)


def weighted_objective(logits: Tensor, x: Tensor, mean: Tensor, logvar: Tensor | None, *,
                       likelihood: Likelihood, recon_scale: float | Tensor, kl_coef: float | Tensor,
                       log_sigma: Tensor | None = None) -> LossTerms:
    """`objective` with its weights given: loss = recon * recon_scale + kl_coef * KL, per sample."""
    recon = recon_nll(logits, x, likelihood, log_sigma)  # (B,)
    kl = kl_per_dim(mean, logvar).sum(1) if logvar is not None else torch.zeros_like(recon)
    return LossTerms(loss=recon * recon_scale + kl_coef * kl, recon=recon, kl=kl)
