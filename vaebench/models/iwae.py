"""`iwae`: the importance-weighted autoencoder (Burda, Grosse & Salakhutdinov 2015).

The VAE's model and posterior, trained on the k-sample importance-weighted bound

    log p(x) >= E[ log (1/k) sum_i p(x, z_i) / q(z_i|x) ],   z_1..k ~ q(z|x)      (their eq. 8)

which tightens with k; k = 1 is the VAE's ELBO (with a single-sample KL estimate). With
`objective: vae` it trains their VAE baseline with k samples instead: the average of the k
log-weights, the ELBO estimated from k samples (their eq. 4 with k draws). The k draws are
part of the step's explicit noise: eps_shape(B) = (k, B, K), so a packed group of iwae runs with
the same k draws, per member, what each would draw alone.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from vaebench.losses import LossTerms, Likelihood, log_normal_diag, recon_nll
from vaebench.models.families import VAE, Output, Posterior


class IWAEOptions(BaseModel):
    """Options of the `iwae` family.

    k: importance samples per image in the training objective (Burda et al. compare 1, 5, 50).
        It fixes the step's shapes: runs with different k do not share a pack.
    objective: `iwae`, -log of the mean of the k importance weights (the IWAE bound), or `vae`,
        minus the mean of their logs (the ELBO from k samples: Burda et al.'s VAE with k samples).
    """

    model_config = ConfigDict(extra="forbid")
    PER_MEMBER: ClassVar[tuple[str, ...]] = ()

    k: int = Field(5, ge=1, le=5000)
    objective: Literal["iwae", "vae"] = "iwae"


class IWAE(VAE):
    """VAE trained on the k-sample importance-weighted bound; takes the VampPrior too."""

    Options: ClassVar[type[BaseModel]] = IWAEOptions

    def eps_shape(self, batch: int) -> tuple[int, ...] | None:
        return (self.options.k, batch, self.latent_dim)

    @property
    def samples_per_image(self) -> int:
        return self.options.k

    def latent(self, posterior: Posterior, eps: Tensor | None = None) -> Tensor:
        """k reparameterised samples per image, (k, B, K)."""
        if eps is None:
            eps = torch.randn(self.options.k, *posterior.mean.shape, device=posterior.mean.device,
                              dtype=posterior.mean.dtype)
        return posterior.mean + torch.exp(0.5 * posterior.logvar) * eps

    def forward(self, x: Tensor, eps: Tensor | None = None) -> Output:
        posterior = self.encode(x)
        z = self.latent(posterior, eps)  # (k, B, K)
        logits = self.decode(z.flatten(0, 1)).unflatten(0, z.shape[:2])  # (k, B, C, H, W)
        return Output(logits, z, posterior)

    def terms(self, out: Output, x: Tensor, *, likelihood: Likelihood, recon_scale: float | Tensor,
              kl_coef: float | Tensor, log_sigma: Tensor | None = None) -> LossTerms:
        """-log (1/k) sum_i w_i per image (objective `vae`: -(1/k) sum_i log w_i), with the weighted
        log-weights log w_i = -(recon_scale * [-log p(x|z_i)] + kl_coef * [log q(z_i|x) - log p(z_i)]):
        with `sum` reduction and beta 1 exactly Burda et al.'s bounds. recon and kl are the means
        over the k samples (their sum is the k-sample estimate of -ELBO)."""
        k, b = out.z.shape[:2]
        target = x.unsqueeze(0).expand(k, *x.shape).flatten(0, 1)  # (k*B, C, H, W)
        recon = recon_nll(out.logits.flatten(0, 1), target, likelihood, log_sigma).view(k, b)  # (k, B)
        post = out.posterior
        kl = log_normal_diag(out.z, post.mean, post.logvar) - self.log_prior(out.z)  # (k, B)
        log_w = -(recon * recon_scale + kl_coef * kl)
        if self.options.objective == "vae":
            loss = -log_w.mean(0)  # (B,)
        else:
            loss = -(torch.logsumexp(log_w, dim=0) - math.log(k))  # (B,)
        return LossTerms(loss=loss, recon=recon.mean(0), kl=kl.mean(0))

    def extra_repr(self) -> str:
        return f"k={self.options.k}, objective={self.options.objective}"
