"""Priors p(z): the standard normal every family starts from, and the VampPrior (Tomczak & Welling
2018) of the Gaussian-posterior families that take one (`prior.kind` in the run settings).

A prior is a small module owned by the model (`model.prior`), so that its parameters (the
VampPrior's pseudo-inputs) live in the model's state_dict and are stacked with it in a packed
group. Its methods take the model as an argument because the VampPrior is defined through the
model's own encoder. The evaluation protocol reads p(z) only through `AutoEncoder.log_prior`, so
`elbo` and `nll_iw` use each model's own prior.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from vaebench.losses import kl_per_dim, log_normal_diag, log_normal_std

if TYPE_CHECKING:
    from vaebench.models.common import Shape
    from vaebench.models.families import AutoEncoder, Posterior

PSEUDO_INPUT_MEAN, PSEUDO_INPUT_STD = 0.05, 0.01  # the initialisation of Tomczak & Welling's code (MNIST)
MIXTURE_CHUNK = 2**24  # at most this many (z, component, dim) terms at once: bounds memory for any k


class StandardPrior(nn.Module):
    """p(z) = N(0, I). Holds nothing: a model with it has the same state_dict as before priors existed."""

    def log_prob(self, z: Tensor, model: AutoEncoder) -> Tensor:
        """log p(z) summed over the last dim: (..., K) -> (...)."""
        return log_normal_std(z)

    def sample(self, n: int, model: AutoEncoder) -> Tensor:
        w = model.to_mean.weight
        return torch.randn(n, model.latent_dim, device=w.device, dtype=w.dtype)

    def kl(self, posterior: Posterior, z: Tensor, model: AutoEncoder) -> Tensor:
        """KL(q(z|x) || p(z)) per sample, (B,): closed form (z is not needed)."""
        return kl_per_dim(posterior.mean, posterior.logvar).sum(1)

    def kl_per_dim(self, posterior: Posterior) -> Tensor | None:
        return kl_per_dim(posterior.mean, posterior.logvar)  # (B, K)


class VampPrior(nn.Module):
    """p(z) = (1/C) sum_c q(z | u_c): the mixture of the model's own posteriors at C learned
    pseudo-inputs u_c (Tomczak & Welling 2018, eq. 9), kept in [0, 1] by a hard tanh as in the
    authors' code. It has no closed-form KL: training uses the single-sample estimate
    log q(z|x) - log p(z) at the z it decodes (their eq. 4); the evaluation's importance weights
    use log p(z) itself."""

    def __init__(self, in_shape: Shape, n_pseudo: int):
        super().__init__()
        self.pseudo_inputs = nn.Parameter(PSEUDO_INPUT_MEAN + PSEUDO_INPUT_STD * torch.randn(n_pseudo, *in_shape))

    def components(self, model: AutoEncoder) -> tuple[Tensor, Tensor]:
        """The mixture's means and log-variances, (C, K) each: the posteriors of the pseudo-inputs.
        Batch norm reads its running statistics here, in training too: the pseudo-inputs are no
        batch of data (normalised by their own statistics, the prior that trains would not be the
        one evaluated, and they would leak into the running statistics the data keeps)."""
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        for m in norms:
            m.train(False)
        try:
            post = model.encode(torch.clamp(self.pseudo_inputs, 0.0, 1.0))  # hardtanh(0, 1)
        finally:
            for m in norms:
                m.train(True)
        return post.mean, post.logvar

    def log_prob(self, z: Tensor, model: AutoEncoder) -> Tensor:
        """log p(z): (..., K) -> (...), a logsumexp over the C components, at most MIXTURE_CHUNK
        terms at a time."""
        mean, logvar = self.components(model)  # (C, K)
        flat = z.reshape(-1, z.shape[-1])  # (N, K)
        rows = max(1, MIXTURE_CHUNK // (mean.numel()))
        parts = [log_normal_diag(chunk.unsqueeze(1), mean, logvar)  # (n, C)
                 for chunk in flat.split(rows)]
        log_p = torch.logsumexp(torch.cat(parts), dim=1) - math.log(mean.shape[0])  # (N,)
        return log_p.view(z.shape[:-1])

    def sample(self, n: int, model: AutoEncoder) -> Tensor:
        mean, logvar = self.components(model)
        pick = torch.randint(mean.shape[0], (n,), device=mean.device)
        return mean[pick] + torch.exp(0.5 * logvar[pick]) * torch.randn(n, mean.shape[1], device=mean.device,
                                                                         dtype=mean.dtype)

    def kl(self, posterior: Posterior, z: Tensor, model: AutoEncoder) -> Tensor:
        """log q(z|x) - log p(z) at z ((B, K), or (k, B, K) for several samples per image)."""
        return log_normal_diag(z, posterior.mean, posterior.logvar) - self.log_prob(z, model)

    def kl_per_dim(self, posterior: Posterior) -> Tensor | None:
        return None  # a mixture does not factorise over the latent dims

    def extra_repr(self) -> str:
        return f"pseudo_inputs={self.pseudo_inputs.shape[0]}"


# Every prior has log_prob(z, model), sample(n, model), kl(posterior, z, model) and kl_per_dim(posterior).
PRIORS = {"standard": StandardPrior, "vamp": VampPrior}
