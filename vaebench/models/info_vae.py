"""`info_vae`: the InfoVAE (Zhao, Song & Ermon 2019), here with the MMD divergence (their
"MMD-VAE" when alpha = 1):

    loss = -E_q[log p(x|z)] + (1 - alpha) KL(q(z|x) || p(z)) + (alpha + lambda - 1) MMD^2(q(z), p(z))

(their eq. 6 with D = MMD). A Gaussian posterior like the VAE's, so the evaluation's ELBO-type
metrics apply. The step's noise is (2, B, K): the reparameterisation draws, then the prior
samples of the MMD term.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, Field, PositiveFloat, model_validator
from torch import Tensor

from vaebench.losses import LossTerms, Likelihood, mmd, recon_nll
from vaebench.models.families import VAE, Output
from vaebench.models.mmd import Kernel, MMDOptions


class InfoVAEOptions(MMDOptions):
    """Options of the `info_vae` family (the kernel: models.mmd.MMDOptions; here Gaussian at one
    scale by default).

    alpha: moves weight from the KL term (1 - alpha) to the MMD term; at most 1.
    weight: lambda, the weight of the divergence between q(z) and p(z); alpha + weight >= 1.
    """

    PER_MEMBER: ClassVar[tuple[str, ...]] = ("alpha", "weight")

    kernel: Kernel = "rbf"
    scales: list[PositiveFloat] = Field(default=[1.0], min_length=1)
    alpha: float = Field(0.0, le=1.0)
    weight: float = Field(1000.0, ge=0.0)

    @model_validator(mode="after")
    def _divergence_weight(self) -> InfoVAEOptions:
        if self.alpha + self.weight < 1.0:
            raise ValueError(f"alpha + weight must be >= 1 (the MMD term's weight alpha + weight - 1 is "
                             f"{self.alpha + self.weight - 1:g})")
        return self


class InfoVAE(VAE):
    """Gaussian posterior and N(0, I) prior, KL and MMD weighted as Zhao et al."""

    Options: ClassVar[type[BaseModel]] = InfoVAEOptions
    priors: ClassVar[tuple[str, ...]] = ("standard",)

    def eps_shape(self, batch: int) -> tuple[int, ...] | None:
        return (2, batch, self.latent_dim)  # [0]: z ~ q(z|x), [1]: z ~ p(z)

    def forward(self, x: Tensor, eps: Tensor | None = None) -> Output:
        posterior = self.encode(x)
        if eps is None:
            eps = torch.randn(2, *posterior.mean.shape, device=x.device, dtype=posterior.mean.dtype)
        z = self.latent(posterior, eps[0])  # (B, K)
        return Output(self.decode(z), z, posterior, extras={"prior_z": eps[1]})

    def terms(self, out: Output, x: Tensor, *, likelihood: Likelihood, recon_scale: float | Tensor,
              kl_coef: float | Tensor, log_sigma: Tensor | None = None) -> LossTerms:
        """recon * recon_scale + kl_coef * ((1 - alpha) KL + (alpha + weight - 1) MMD^2) per sample;
        `kl` is the KL alone (so that val/neg_elbo stays the ELBO)."""
        recon = recon_nll(out.logits, x, likelihood, log_sigma)  # (B,)
        kl = self.kl(out.posterior, out.z)  # (B,)
        penalty = mmd(out.z, out.extras["prior_z"], self.options.kernel, self.options.scales)
        reg = (1.0 - self.alpha) * kl + (self.alpha + self.weight - 1.0) * penalty
        return LossTerms(loss=recon * recon_scale + kl_coef * reg, recon=recon, kl=kl)

    def extra_repr(self) -> str:
        o = self.options
        return f"alpha={o.alpha}, weight={o.weight}, kernel={o.kernel}"
