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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)


def bernoulli_nll(logits: Tensor, x: Tensor, log_sigma: Tensor | None = None) -> Tensor:
    """-log Bernoulli(x | sigmoid(logits)) per pixel, (B, C, H, W); x in [0, 1].
    Computed on logits for stability (pytorch/examples vae/main.py uses BCE on probabilities):
    max(l, 0) - x l + log(1 + exp(-|l|)).

    Under no_grad or inference_mode on the CPU (evaluation, validation) that formula is written out:
    PyTorch's CPU log_sigmoid, behind its fused BCE, takes x1.8-2.2 as long (its log1p is not
    vectorised), and the IWAE estimate runs it k times per image. log(1 + u) in place of log1p(u)
    costs at most half an ulp of 1 (6e-8 nats) a pixel: over an image, a few ulps of its fp32 sum
    (benchmarks/bench_evaluate.py measures both on the same logits).
    With grad mode on, and on a GPU, the fused kernel (one kernel, its own backward)."""
    # grad mode, not requires_grad: under vmap (a packed step) the batched logits do not show it
    if logits.device.type == "cpu" and not torch.is_grad_enabled():
        out = torch.exp(-logits.abs())
        return out.add_(1.0).log_().add_(logits.clamp_min(0)).sub_(x * logits)
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


def tc_decomposition(z: Tensor, mean: Tensor, logvar: Tensor, log_pz: Tensor, dataset_size: Tensor | float
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """(mutual information, total correlation, dimension-wise KL) per sample, (B,) each, for
    z (B, K) ~ q(z|x) of a batch with posteriors N(mean, exp(logvar)) (B, K) and log p(z) (B,),
    by minibatch-weighted sampling (Chen et al. 2018, eq. S5). They sum to log q(z|x) - log p(z)."""
    b = z.shape[0]
    # log q(z_i | x_j) per dim, (B, B, K): sample i against the posterior of image j
    pairs = -0.5 * ((z.unsqueeze(1) - mean.unsqueeze(0)).pow(2) * torch.exp(-logvar.unsqueeze(0))
                    + logvar.unsqueeze(0) + LOG_2PI)
    log_n = torch.log(dataset_size) if isinstance(dataset_size, Tensor) else math.log(dataset_size)
    log_nm = log_n + math.log(b)
    log_qz = torch.logsumexp(pairs.sum(2), dim=1) - log_nm  # (B,)
    log_prod_qzj = (torch.logsumexp(pairs, dim=1) - log_nm).sum(1)  # (B,)
    log_qz_x = log_normal_diag(z, mean, logvar)  # (B,)
    return log_qz_x - log_qz, log_qz - log_prod_qzj, log_prod_qzj - log_pz


def mmd_kernel(a: Tensor, b: Tensor, kernel: str, scales: Sequence[float]) -> Tensor:
    """k(a_i, b_j), (n, m), for a (n, K) and b (m, K), summed over the scales s with C = 2 K s:
    `imq` C / (C + |a - b|^2) (inverse multiquadratic), `rbf` exp(-|a - b|^2 / C) (Gaussian).
    C = 2 K sigma^2 with the prior's sigma^2 = 1, several scales at once: Tolstikhin et al. 2018,
    sec. 4 and their code."""
    d2 = (a.unsqueeze(1) - b.unsqueeze(0)).pow(2).sum(-1)  # (n, m); exact, unlike the |a|^2 - 2ab + |b|^2 form
    k = a.shape[-1]
    out = torch.zeros_like(d2)
    for s in scales:
        c = 2.0 * k * s
        out = out + (c / (c + d2) if kernel == "imq" else torch.exp(-d2 / c))
    return out


def mmd(z: Tensor, prior_z: Tensor, kernel: str, scales: Sequence[float]) -> Tensor:
    """The unbiased estimate of MMD^2 between the distributions of z (n, K) and prior_z (m, K) (Gretton
    et al. 2012, eq. 3): the mean of k over pairs within each sample, diagonals left out, minus twice
    the mean over pairs across. A scalar (0-dim); a single sample has no pairs within (they count 0)."""
    n, m = z.shape[0], prior_z.shape[0]
    kzz, kpp = mmd_kernel(z, z, kernel, scales), mmd_kernel(prior_z, prior_z, kernel, scales)
    within_z = (kzz.sum() - kzz.diagonal().sum()) / max(n * (n - 1), 1)
    within_p = (kpp.sum() - kpp.diagonal().sum()) / max(m * (m - 1), 1)
    return within_z + within_p - 2.0 * mmd_kernel(z, prior_z, kernel, scales).mean()


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
