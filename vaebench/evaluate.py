"""The fixed evaluation protocol: the same numbers, computed the same way, for every run.

Whatever a run was trained with (reduction, beta, annealing), it is evaluated with beta = 1,
`sum` reduction and its own likelihood, on the test split, in eval mode:

  elbo        E_q[log p(x|z)] - KL(q(z|x) || p(z)), nats per image; bpd = -elbo / (D ln 2)
  nll_iw      -log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x)  (Burda et al. 2015); <= -elbo
  recon_*     from the posterior mean: MSE per pixel, BCE per image
  kl          total, and per latent dim; active_units = #dims with Var_x(E_q[z_d|x]) > 0.01

Deterministic families (ae, dae) have no ELBO: those metrics are absent (not applicable), never 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from vaebench.batches import DeviceSplit
from vaebench.config import EvaluateSettings, RunSettings
from vaebench.losses import LIKELIHOODS, LOG_2PI, kl_per_dim
from vaebench.models import AutoEncoder
from vaebench.train import log_sigma_of

ACTIVE_UNIT_THRESHOLD = 0.01
STOCHASTIC_ONLY = ("elbo", "bpd", "nll_iw", "kl", "active_units")


@dataclass
class Evaluation:
    metrics: dict[str, float]                        # test/* metric name (without prefix) -> value
    kl_per_dim: list[float] = field(default_factory=list)
    not_applicable: tuple[str, ...] = ()


def log_normal_std(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last dim."""
    return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)


def log_normal_diag(z: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    return -0.5 * ((z - mean).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


@torch.inference_mode()
def iw_nll(model: AutoEncoder, x: Tensor, settings: RunSettings, k: int, chunk: int = 50_000,
           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Importance-weighted -log p(x) per image, (B,), with k posterior samples, drawn in chunks
    of at most `chunk` decoded images so memory stays bounded for any k and batch size.

    Also returns the k-sample Monte Carlo ELBO, mean_i log w_i, (B,): from the same samples, so
    that nll_iw <= -elbo holds exactly (Jensen), not just in expectation."""
    post = model.encode(x)
    mean, logvar = post.mean, post.logvar  # (B, K)
    b = x.shape[0]
    per_chunk = max(1, chunk // b)
    log_sigma = log_sigma_of(model, settings, x)
    running = None  # (B,) logsumexp of the log-weights seen so far
    total = torch.zeros(b, device=x.device, dtype=x.dtype)  # (B,) sum of the log-weights
    for start in range(0, k, per_chunk):
        n = min(per_chunk, k - start)
        eps = torch.randn((n, *mean.shape), device=x.device, dtype=x.dtype, generator=generator)
        z = mean + torch.exp(0.5 * logvar) * eps  # (n, B, K)
        logits = model.decode(z.reshape(n * b, -1))  # (n*B, C, H, W)
        target = x.unsqueeze(0).expand(n, *x.shape).reshape(n * b, *x.shape[1:])
        log_px = -LIKELIHOODS[settings.likelihood](logits, target, log_sigma).flatten(1).sum(1).view(n, b)
        log_w = log_px + log_normal_std(z) - log_normal_diag(z, mean, logvar)  # (n, B)
        chunk_lse = torch.logsumexp(log_w, dim=0)
        running = chunk_lse if running is None else torch.logaddexp(running, chunk_lse)
        total += log_w.sum(0)
    return -(running - math.log(k)), total / k


@torch.inference_mode()
def evaluate(model: AutoEncoder, split: DeviceSplit, settings: RunSettings,
             protocol: EvaluateSettings | None = None, batch_size: int = 500) -> Evaluation:
    protocol = protocol or EvaluateSettings()
    model.eval()
    device = split.x.device
    gen = torch.Generator(device=device).manual_seed(0)  # the same draws for every run
    n = 0
    sums: dict[str, float] = {"recon_mse": 0.0, "recon_bce": 0.0, "elbo": 0.0, "nll_iw": 0.0}
    kl_dims = None
    means = []
    c, h, w = split.shape
    num_pixels = c * h * w
    for x, _ in split.iter_batches(batch_size):
        post = model.encode(x)
        logits = model.decode(post.mean)
        sums["recon_mse"] += F.mse_loss(torch.sigmoid(logits), x, reduction="sum").item() / num_pixels
        sums["recon_bce"] += F.binary_cross_entropy_with_logits(logits, x, reduction="sum").item()
        means.append(post.mean.float())
        if model.stochastic:
            kl = kl_per_dim(post.mean, post.logvar)  # (B, K)
            kl_dims = kl.sum(0) if kl_dims is None else kl_dims + kl.sum(0)
            nll, elbo = iw_nll(model, x, settings, protocol.iw_samples, protocol.iw_chunk, gen)
            sums["nll_iw"] += nll.sum().item()
            sums["elbo"] += elbo.sum().item()
        n += x.shape[0]
    metrics = {"recon_mse": sums["recon_mse"] / n, "recon_bce": sums["recon_bce"] / n}
    if not model.stochastic:
        return Evaluation(metrics=metrics, not_applicable=STOCHASTIC_ONLY)
    per_dim = (kl_dims / n).tolist()
    mu = torch.cat(means)  # (N, K)
    metrics.update({
        "elbo": sums["elbo"] / n,
        "bpd": -(sums["elbo"] / n) / (num_pixels * math.log(2)),
        "nll_iw": sums["nll_iw"] / n,
        "nll_iw_k": float(protocol.iw_samples),
        "kl": sum(per_dim),
        "active_units": float((mu.var(0) > ACTIVE_UNIT_THRESHOLD).sum().item()),
    })
    return Evaluation(metrics=metrics, kl_per_dim=per_dim)
