"""One training step of one model, in the pieces that both trainers share: the plain loop
(vaebench.train) calls them on a module, the packed engine (vaebench.packed) calls the very same
functions under `torch.func.vmap` on a stack of modules.

Randomness is explicit. A run owns two streams, seeded from its `seed`: `shuffle` (a CPU generator:
one permutation of the training split per epoch) and `noise` (on the training device: everything
a step draws). A step draws, in this order and only what applies:

  uniform  (B, C, H, W)  dynamic binarization: x_bin = (uniform < x)
  corrupt  (B, C, H, W)  the corruption noise of denoising families
  eps      eps_shape(B)  the reparameterisation noise of stochastic families

Because every draw comes from the run's own generator, a member of a packed group sees exactly the
numbers it would see trained alone, and its results match the unpacked run to float precision.
Validation draws from a fixed-seed generator, the same at every epoch and for every run.

Nothing here knows about epochs, optimisers or MLflow.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from vaebench.config import RunSettings
from vaebench.losses import Likelihood
from vaebench.models import AutoEncoder

VAL_SEED = 0  # the validation pass draws the same noise at every epoch and for every run


class Noise(NamedTuple):
    """One step's random draws for one model (None where they do not apply); a stack's carry a
    leading member axis."""

    uniform: Tensor | None = None
    corrupt: Tensor | None = None
    eps: Tensor | None = None


class Streams:
    """A run's two random streams (module docstring). Their state is what a checkpoint's `rng` holds."""

    def __init__(self, seed: int, device: torch.device):
        self.shuffle = torch.Generator(device="cpu").manual_seed(seed)
        self.noise = torch.Generator(device=device).manual_seed(seed + 1)

    def permutation(self, n: int, device: torch.device) -> Tensor:
        """The next epoch's order of the n training images, (n,) int64 on `device`."""
        return torch.randperm(n, generator=self.shuffle).to(device)

    def get_state(self) -> dict[str, Tensor]:
        return {"shuffle": self.shuffle.get_state(), "noise": self.noise.get_state()}

    def set_state(self, rng: dict[str, Any]) -> None:
        self.shuffle.set_state(rng["shuffle"])
        self.noise.set_state(rng["noise"])


def draw_noise(model: AutoEncoder, generator: torch.Generator, batch: int, shape: tuple[int, int, int], *,
               dynamic: bool, out: Noise | None = None) -> Noise:
    """Draw one step's noise for `batch` images of `shape` (C, H, W) from `generator`, in the fixed
    order of the module docstring; with `out`, write into its tensors instead (static buffers of
    a captured step), which must match in shape."""
    device = generator.device
    eps_shape = model.eps_shape(batch)

    def fill(draw, size: tuple[int, ...], into: Tensor | None) -> Tensor:
        if into is not None:
            return draw(size, generator=generator, out=into)
        return draw(size, generator=generator, device=device)

    uniform = fill(torch.rand, (batch, *shape), out and out.uniform) if dynamic else None
    corrupt = fill(torch.randn, (batch, *shape), out and out.corrupt) if model.denoising else None
    eps = fill(torch.randn, eps_shape, out and out.eps) if eps_shape is not None else None
    return Noise(uniform, corrupt, eps)


def loss_and_sums(model: AutoEncoder, x: Tensor, noise: Noise, *, likelihood: Likelihood,
                  recon_scale: float | Tensor, kl_coef: float | Tensor,
                  log_sigma: Tensor | None) -> tuple[Tensor, Tensor]:
    """One model's objective on a batch x (B, C, H, W) in [0, 1] (already binarized): the batch
    loss (mean over the batch, what the optimiser minimises) and the (3,) sums over the batch of
    the per-sample loss, reconstruction and KL (what the epoch metrics are made of).

    `log_sigma` is the fixed Gaussian log std-dev; a model that learns its own uses that instead."""
    x_in = model.corrupt(x, noise.corrupt) if model.denoising else x
    out = model(x_in, noise.eps)
    own = model.log_sigma if model.log_sigma is not None else log_sigma
    terms = model.terms(out, x, likelihood=likelihood, recon_scale=recon_scale, kl_coef=kl_coef, log_sigma=own)
    return terms.loss.mean(), torch.stack([terms.loss.sum(), terms.recon.sum(), terms.kl.sum()])


def fixed_log_sigma(settings: RunSettings, device: torch.device | str = "cpu") -> Tensor | None:
    """The Gaussian likelihood's fixed log std-dev, or None (Bernoulli, or a learned sigma)."""
    if settings.likelihood != "gaussian" or settings.gaussian_sigma == "learned":
        return None
    return torch.tensor(float(settings.gaussian_sigma), device=device).log()


def log_sigma_of(model: AutoEncoder, settings: RunSettings, like: Tensor) -> Tensor | None:
    """The Gaussian likelihood's log std-dev: learned, fixed, or None for Bernoulli."""
    if settings.likelihood != "gaussian":
        return None
    if model.log_sigma is not None:
        return model.log_sigma
    return like.new_tensor(float(settings.gaussian_sigma)).log()
