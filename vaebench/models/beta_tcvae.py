"""`beta_tcvae`: the VAE whose KL term is split into its three parts and weighted apart (Chen, Li,
Grosse & Duvenaud 2018, "Isolating Sources of Disentanglement in VAEs"):

    E_x KL(q(z|x) || p(z)) = I_q(x; z)                       index-code mutual information (alpha)
                           + KL(q(z) || prod_j q(z_j))       total correlation (beta)
                           + sum_j KL(q(z_j) || p(z_j))      dimension-wise KL (gamma)

The aggregate posterior q(z) is estimated on the minibatch with their minibatch-weighted sampling
(MWS, their eq. S5): for z_i ~ q(z|x_i) in a batch of M images from a training set of N,

    log q(z_i) ~ logsumexp_j log q(z_i|x_j) - log(N M),  and the same per dim for log q(z_ij).

N is the training split's size, which the trainers tell the model (`set_dataset_size`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from vaebench.losses import LossTerms, Likelihood, recon_nll, tc_decomposition
from vaebench.models.families import VAE, Output


class BetaTCVAEOptions(BaseModel):
    """Options of the `beta_tcvae` family: the weights of the three parts of the KL term. With
    alpha = beta = gamma = 1 the objective is the VAE's (with a single-sample KL estimate); Chen et
    al. keep alpha = gamma = 1 and raise beta. The run's own `beta` setting still weighs the whole
    term (and KL annealing scales it), as for every family."""

    model_config = ConfigDict(extra="forbid")
    PER_MEMBER: ClassVar[tuple[str, ...]] = ("alpha", "beta", "gamma")  # scalars: members of a pack differ freely

    alpha: float = Field(1.0, ge=0.0)  # index-code mutual information
    beta: float = Field(6.0, ge=0.0)  # total correlation
    gamma: float = Field(1.0, ge=0.0)  # dimension-wise KL


class BetaTCVAE(VAE):
    """Gaussian posterior, standard normal prior (the dimension-wise term needs a factorised one)."""

    Options: ClassVar[type[BaseModel]] = BetaTCVAEOptions
    priors: ClassVar[tuple[str, ...]] = ("standard",)

    def __init__(self, encoder: nn.Module, decoder: nn.Module, **kwargs) -> None:
        super().__init__(encoder, decoder, **kwargs)
        # N of the MWS estimator; a buffer like the weights, so that it follows the model's device
        self.register_buffer("dataset_size", torch.tensor(1.0), persistent=False)

    def set_dataset_size(self, n: int) -> None:
        self.dataset_size.fill_(float(n))

    def terms(self, out: Output, x: Tensor, *, likelihood: Likelihood, recon_scale: float | Tensor,
              kl_coef: float | Tensor, log_sigma: Tensor | None = None) -> LossTerms:
        """recon * recon_scale + kl_coef * (alpha MI + beta TC + gamma dimKL) per sample; `kl` is
        their unweighted sum, log q(z|x) - log p(z) at the sampled z."""
        recon = recon_nll(out.logits, x, likelihood, log_sigma)  # (B,)
        post = out.posterior
        mi, tc, dim_kl = tc_decomposition(out.z, post.mean, post.logvar, self.log_prior(out.z), self.dataset_size)
        weighted = self.alpha * mi + self.beta * tc + self.gamma * dim_kl
        return LossTerms(loss=recon * recon_scale + kl_coef * weighted, recon=recon, kl=mi + tc + dim_kl)

    def extra_repr(self) -> str:
        o = self.options
        return f"alpha={o.alpha}, beta={o.beta}, gamma={o.gamma}"
