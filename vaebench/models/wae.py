"""`wae_mmd`: the Wasserstein autoencoder with the MMD penalty (Tolstikhin, Bousquet, Gelly &
Schoelkopf 2018, Algorithm 2).

A deterministic encoder, and a penalty that pulls the distribution of the codes over the batch,
not each code, towards the prior:

    loss = c(x, G(E(x))) + lambda * MMD^2({E(x_i)}, {z~_i}),   z~_i ~ p(z) = N(0, I)

with the run's likelihood as the cost c. The prior samples z~ are the step's explicit noise
(eps_shape(B) = (B, K)). It is generative (decode prior samples) but has no posterior density,
hence no ELBO: the evaluation reports its ELBO-type metrics as not applicable, as for ae.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, Field
from torch import Tensor

from vaebench.losses import LossTerms, Likelihood, mmd, recon_nll
from vaebench.models.families import AutoEncoder, Output
from vaebench.models.mmd import MMDOptions


class WAEOptions(MMDOptions):
    """Options of the `wae_mmd` family (the kernel: models.mmd.MMDOptions).

    weight: lambda, the weight of the MMD penalty (Tolstikhin et al. use 10 on MNIST).
    """

    PER_MEMBER: ClassVar[tuple[str, ...]] = ("weight",)

    weight: float = Field(10.0, ge=0.0)


class WAE(AutoEncoder):
    """Deterministic encoder, N(0, I) prior matched by MMD."""

    Options: ClassVar[type[BaseModel]] = WAEOptions
    regularised: ClassVar[bool] = True  # its val/kl and train/kl hold the regulariser
    generative: ClassVar[bool] = True

    def eps_shape(self, batch: int) -> tuple[int, ...] | None:
        return (batch, self.latent_dim)  # prior samples for the penalty

    def forward(self, x: Tensor, eps: Tensor | None = None) -> Output:
        posterior = self.encode(x)
        z = posterior.mean  # (B, K)
        prior_z = torch.randn_like(z) if eps is None else eps
        return Output(self.decode(z), z, posterior, extras={"prior_z": prior_z})

    def terms(self, out: Output, x: Tensor, *, likelihood: Likelihood, recon_scale: float | Tensor,
              kl_coef: float | Tensor, log_sigma: Tensor | None = None) -> LossTerms:
        """recon * recon_scale + kl_coef * weight * MMD^2 per sample; `kl` holds the batch's MMD^2
        (the same for every image of the batch: it is a property of the batch, not of one code)."""
        recon = recon_nll(out.logits, x, likelihood, log_sigma)  # (B,)
        penalty = mmd(out.z, out.extras["prior_z"], self.options.kernel, self.options.scales).expand_as(recon)
        return LossTerms(loss=recon * recon_scale + kl_coef * self.weight * penalty, recon=recon, kl=penalty)

    def extra_repr(self) -> str:
        return f"kernel={self.options.kernel}, weight={self.options.weight}"
