"""Model families: how an encoder's features become a latent, what the trainer corrupts, and the
per-sample training objective.

Every family is encoder (B, C, H, W) -> (B, F) -> linear head(s) -> (B, K) -> decoder -> (B, C, H, W)
logits. The trainer calls `model(model.corrupt(x, noise), eps)` and scores the output with
`model.terms(out, x, ...)` against the clean `x`; `forward` itself never corrupts.

Randomness is an input, not a side effect: the trainer draws the standard-normal `eps` of shape
`eps_shape(B)` and the corruption noise (for `denoising` families) from the run's own generator and
passes them in. That is what lets a packed group of runs (vaebench.packed) draw, for each member,
exactly the numbers that member would draw alone. Called without them (evaluation, figures), the
families draw from torch's global generator.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from vaebench.losses import LossTerms, Likelihood, weighted_objective
from vaebench.models.common import Shape


@dataclass
class Posterior:
    mean: Tensor  # (B, K)
    logvar: Tensor | None  # (B, K) for stochastic families, None for deterministic ones


@dataclass
class Output:
    logits: Tensor  # (B, C, H, W) unconstrained; the likelihood applies the sigmoid
    z: Tensor  # (B, K) the latent actually decoded
    posterior: Posterior


class AutoEncoder(nn.Module):
    """Base of every family; deterministic (z = mean) unless a subclass says otherwise.

    `noise` is accepted by every family so one call signature builds them all, but only `dae`
    uses it. `log_sigma` is the scalar learned log std-dev of a Gaussian likelihood, or None.
    """

    stochastic: ClassVar[bool] = False  # has a posterior to sample (and an ELBO)
    denoising: ClassVar[bool] = False  # corrupts its training inputs with Gaussian noise

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        *,
        in_shape: Shape,
        latent_dim: int,
        noise: float = 0.0,
        learn_sigma: bool = False,
    ) -> None:
        super().__init__()
        if not noise >= 0:  # also rejects NaN
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.in_shape = tuple(in_shape)
        self.latent_dim = latent_dim
        self.noise = float(noise)
        self.encoder = encoder
        self.decoder = decoder
        self.to_mean = nn.Linear(encoder.out_features, latent_dim)
        # registered either way, so `model.log_sigma` is None (and absent from state_dict) when not learned
        self.register_parameter("log_sigma", nn.Parameter(torch.zeros(())) if learn_sigma else None)

    def encode(self, x: Tensor) -> Posterior:
        return Posterior(self.to_mean(self.encoder(x)), None)  # x (B, C, H, W) in [0, 1] -> (B, K)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)  # (B, K) -> (B, C, H, W) logits

    def eps_shape(self, batch: int) -> tuple[int, ...] | None:
        """Shape of the standard-normal draws `forward` consumes for a batch of `batch` images
        (None: it draws nothing)."""
        return None

    def latent(self, posterior: Posterior, eps: Tensor | None = None) -> Tensor:
        """The z that forward decodes: the posterior mean for deterministic families."""
        return posterior.mean

    def forward(self, x: Tensor, eps: Tensor | None = None) -> Output:
        posterior = self.encode(x)
        z = self.latent(posterior, eps)
        return Output(self.decode(z), z, posterior)

    def corrupt(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """Training-time input corruption (`noise`: standard normal, x's shape); identity unless
        the family denoises."""
        return x

    def terms(self, out: Output, x: Tensor, *, likelihood: Likelihood, recon_scale: float | Tensor,
              kl_coef: float | Tensor, log_sigma: Tensor | None = None) -> LossTerms:
        """The per-sample training objective of `out` against the clean `x` (losses.weighted_objective:
        recon * recon_scale + kl_coef * KL). Scalars may be tensors: one per member of a packed group."""
        return weighted_objective(out.logits, x, out.posterior.mean, out.posterior.logvar, likelihood=likelihood,
                                  recon_scale=recon_scale, kl_coef=kl_coef, log_sigma=log_sigma)

    def sample_prior(self, n: int) -> Tensor:
        """z ~ N(0, I), (n, K), on the model's device and dtype."""
        w = self.to_mean.weight
        return torch.randn(n, self.latent_dim, device=w.device, dtype=w.dtype)


class AE(AutoEncoder):
    """Deterministic autoencoder."""


class VAE(AutoEncoder):
    """Gaussian posterior N(mean, exp(logvar)), standard normal prior, reparameterised sampling.

    forward always samples, in train and eval mode alike; use `encode(x).mean` for a deterministic code.
    """

    stochastic: ClassVar[bool] = True

    def __init__(self, encoder: nn.Module, decoder: nn.Module, **kwargs) -> None:
        super().__init__(encoder, decoder, **kwargs)
        self.to_logvar = nn.Linear(encoder.out_features, self.latent_dim)

    def encode(self, x: Tensor) -> Posterior:
        h = self.encoder(x)  # (B, F)
        return Posterior(self.to_mean(h), self.to_logvar(h))

    def eps_shape(self, batch: int) -> tuple[int, ...] | None:
        return (batch, self.latent_dim)

    def latent(self, posterior: Posterior, eps: Tensor | None = None) -> Tensor:
        eps = torch.randn_like(posterior.mean) if eps is None else eps  # (B, K)
        return posterior.mean + torch.exp(0.5 * posterior.logvar) * eps


class DAE(AutoEncoder):
    """Denoising autoencoder: deterministic like AE, trained on inputs with clipped Gaussian noise."""

    denoising: ClassVar[bool] = True

    def __init__(self, encoder: nn.Module, decoder: nn.Module, **kwargs) -> None:
        super().__init__(encoder, decoder, **kwargs)
        # The noise factor as a buffer, so that members of a packed group (stacked buffers) each
        # keep their own; not persistent: checkpoints hold weights only, the factor is a setting.
        self.register_buffer("noise_scale", torch.tensor(self.noise), persistent=False)

    def corrupt(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        noise = torch.randn_like(x) if noise is None else noise
        return torch.clamp(x + self.noise_scale * noise, 0.0, 1.0)

    def extra_repr(self) -> str:
        return f"noise={self.noise}"


FAMILIES: dict[str, type[AutoEncoder]] = {
    "ae": AE,
    "vae": VAE,
    "dae": DAE,
}
