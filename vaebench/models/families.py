"""Model families: how an encoder's features become a latent, what the trainer corrupts, and the
per-sample training objective. This module holds the base class and the three first families
(`ae`, `vae`, `dae`); every other family has its own module and one line in models.build.FAMILIES.

Every family is encoder (B, C, H, W) -> (B, F) -> linear head(s) -> (B, K) -> decoder -> (B, C, H, W)
logits. The trainer calls `model(model.corrupt(x, noise), eps)` and scores the output with
`model.terms(out, x, ...)` against the clean `x`; `forward` itself never corrupts.

Randomness is an input, not a side effect: the trainer draws the standard-normal `eps` of shape
`eps_shape(B)` and the corruption noise (for `denoising` families) from the run's own generator and
passes them in. That is what lets a packed group of runs (vaebench.packed) draw, for each member,
exactly the numbers that member would draw alone. Called without them (evaluation, figures), the
families draw from torch's global generator.

What a family may do, so that a packed group can run it under `torch.func.vmap`: no `.item()`, no
Python branching on tensor values, in-place updates on buffers only. Its scalar options that
members of a pack may differ in (`Options.PER_MEMBER`) are registered as buffers (`option_buffers`):
stacked with the rest, each member computes with its own.

A family's settings are a pydantic `Options` model (`family_options.<name>` in the run settings);
its prior p(z) is `model.prior` (vaebench.models.priors), read by the evaluation through
`log_prior` so that `elbo` and `nll_iw` use each model's own prior.
"""

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from vaebench.losses import LossTerms, Likelihood, recon_nll, weighted_objective
from vaebench.models.common import Shape
from vaebench.models.priors import PRIORS


@dataclass
class Posterior:
    mean: Tensor  # (B, K) the code of x: posterior mean (vq_vae: the quantised code)
    logvar: Tensor | None  # (B, K) for stochastic families, None for deterministic ones
    codes: Tensor | None = None  # (B, M) int64 codebook indices of discrete families (vq_vae), else None


@dataclass
class Output:
    logits: Tensor  # (B, C, H, W) unconstrained (iwae: (k, B, C, H, W)); the likelihood applies the sigmoid
    z: Tensor  # (B, K) the latent actually decoded (iwae: (k, B, K))
    posterior: Posterior
    extras: dict[str, Tensor] = field(default_factory=dict)  # what a family's `terms` needs besides


class NoOptions(BaseModel):
    """A family without settings of its own."""

    model_config = ConfigDict(extra="forbid")
    PER_MEMBER: ClassVar[tuple[str, ...]] = ()  # options members of a packed group may differ in


class AutoEncoder(nn.Module):
    """Base of every family; deterministic (z = mean) unless a subclass says otherwise.

    `noise` is accepted by every family so one call signature builds them all, but only `dae`
    uses it. `log_sigma` is the scalar learned log std-dev of a Gaussian likelihood, or None.
    `options` are the family's own settings (an `Options` instance or a dict it validates);
    `prior` names a PRIORS entry the family supports (`priors`).
    """

    stochastic: ClassVar[bool] = False  # has a posterior to sample (and an ELBO)
    denoising: ClassVar[bool] = False  # corrupts its training inputs with Gaussian noise
    generative: ClassVar[bool] = False  # has a prior worth sampling from (figures: samples.png)
    regularised: ClassVar[bool] = False  # has a regulariser (logged as train/kl, val/kl; else 0)
    Options: ClassVar[type[BaseModel]] = NoOptions  # its `family_options.<name>` block
    priors: ClassVar[tuple[str, ...]] = ("standard",)  # the `prior.kind`s it supports
    num_codes: int | None = None  # the codebook size of discrete families (Posterior.codes index it)

    @property
    def samples_per_image(self) -> int:
        """Images `forward` decodes per input image (iwae: k); bounds the validation batch."""
        return 1

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        *,
        in_shape: Shape,
        latent_dim: int,
        noise: float = 0.0,
        learn_sigma: bool = False,
        options: BaseModel | dict | None = None,
        prior: str = "standard",
        pseudo_inputs: int = 500,
    ) -> None:
        super().__init__()
        if not noise >= 0:  # also rejects NaN
            raise ValueError(f"noise must be >= 0, got {noise}")
        if prior not in self.priors:
            raise ValueError(f"{type(self).__name__} has no {prior!r} prior; allowed: {', '.join(self.priors)}")
        self.in_shape = tuple(in_shape)
        self.latent_dim = latent_dim
        self.noise = float(noise)
        self.options = options if isinstance(options, self.Options) else self.Options.model_validate(options or {})
        self.check(latent_dim, self.options)
        self.encoder = encoder
        self.decoder = decoder
        self.to_mean = nn.Linear(encoder.out_features, latent_dim)
        # registered either way, so `model.log_sigma` is None (and absent from state_dict) when not learned
        self.register_parameter("log_sigma", nn.Parameter(torch.zeros(())) if learn_sigma else None)
        self.prior = PRIORS[prior](self.in_shape, pseudo_inputs) if prior == "vamp" else PRIORS[prior]()
        for name in self.Options.PER_MEMBER:
            self.register_buffer(name, torch.tensor(float(getattr(self.options, name))), persistent=False)

    @classmethod
    def check(cls, latent_dim: int, options: BaseModel) -> None:
        """Raise ValueError when the options do not fit this latent size (config validation calls it too)."""

    def set_dataset_size(self, n: int) -> None:
        """Told the number of training images before training (beta_tcvae's estimator needs it)."""

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
        """z ~ p(z), (n, K), on the model's device and dtype."""
        return self.prior.sample(n, self)

    def log_prior(self, z: Tensor) -> Tensor:
        """log p(z) under the model's own prior, summed over the last dim: (..., K) -> (...)."""
        return self.prior.log_prob(z, self)

    def kl(self, posterior: Posterior, z: Tensor) -> Tensor:
        """KL(q(z|x) || p(z)) per sample (B,): closed form where the prior allows, else the
        single-sample estimate log q(z|x) - log p(z) at z (stochastic families only)."""
        return self.prior.kl(posterior, z, self)

    def kl_per_dim(self, posterior: Posterior) -> Tensor | None:
        """KL per latent dim (B, K) in closed form, or None where the prior does not factorise."""
        return self.prior.kl_per_dim(posterior)


class AE(AutoEncoder):
    """Deterministic autoencoder."""


class VAE(AutoEncoder):
    """Gaussian posterior N(mean, exp(logvar)), standard normal prior, reparameterised sampling.

    forward always samples, in train and eval mode alike; use `encode(x).mean` for a deterministic code.
    Takes the VampPrior too (`prior.kind: vamp`).
    """

    stochastic: ClassVar[bool] = True
    regularised: ClassVar[bool] = True
    generative: ClassVar[bool] = True
    priors: ClassVar[tuple[str, ...]] = ("standard", "vamp")

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

    def terms(self, out: Output, x: Tensor, *, likelihood: Likelihood, recon_scale: float | Tensor,
              kl_coef: float | Tensor, log_sigma: Tensor | None = None) -> LossTerms:
        """recon * recon_scale + kl_coef * KL(q(z|x) || p(z)) per sample, under the model's prior
        (Kingma & Welling 2014); with the standard prior exactly losses.weighted_objective."""
        recon = recon_nll(out.logits, x, likelihood, log_sigma)  # (B,)
        kl = self.kl(out.posterior, out.z)  # (B,)
        return LossTerms(loss=recon * recon_scale + kl_coef * kl, recon=recon, kl=kl)


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

