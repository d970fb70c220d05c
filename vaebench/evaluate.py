"""The fixed evaluation protocol: the same numbers, computed the same way, for every run.

Whatever a run was trained with (reduction, beta, annealing), it is evaluated with beta = 1,
`sum` reduction and its own likelihood, on the test split, in eval mode:

  elbo        E_q[log p(x|z)] - KL(q(z|x) || p(z)), nats per image; bpd = -elbo / (D ln 2)
  nll_iw      -log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x)  (Burda et al. 2015); <= -elbo
  recon_*     from the posterior mean: MSE per pixel, BCE per image (dae: also from noisy inputs)
  kl          total, and per latent dim; active_units = #dims with Var_x(E_q[z_d|x]) > 0.01
  clustering  on posterior means with the labels (vaebench.clustering), and the same scores on
              raw pixels as the dataset's baseline
  codebook_*  discrete families (vq_vae): perplexity exp(H) of the code usage on the test split,
              dead codes (never used) and the share of the codebook used

p(z) is the model's own prior (`model.log_prior`): the VampPrior of a run that trained with it. Where
the prior has no closed-form KL, `kl` is the Monte Carlo estimate E_q[log q(z|x) - log p(z)] from
the same k samples, and there is no per-dim table.

Families without an ELBO (ae, dae, wae_mmd, vq_vae: no posterior distribution) have no elbo, bpd,
nll_iw, kl, active_units: those metrics are absent (not applicable), never 0. Their clustering is
scored on their codes: the encoder's output (vq_vae: the quantised code). A dataset of one class
(an image folder without class subfolders) has no clustering scores: its labels tell nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vaebench.batches import DeviceSplit
from vaebench.clustering import SCORE_KEYS
from vaebench.config import EvaluateSettings, RunSettings
from vaebench.losses import LIKELIHOODS, log_normal_diag, log_normal_std
from vaebench.models import AutoEncoder, Posterior
from vaebench.step import log_sigma_of

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2015
STOCHASTIC_ONLY = ("elbo", "bpd", "nll_iw", "nll_iw_k", "kl", "active_units")
CODEBOOK_ONLY = ("codebook_perplexity", "dead_codes", "codebook_usage")
EVAL_SEED = 0  # the same posterior draws for every run
# The devices on which `evaluate` runs a conv model's convolutions channels-last (NHWC). The values are
# the same to float rounding (metrics 1e-8 apart on the CPU at our shapes, often bit for bit); what
# changes is the speed of the decoder, which the IWAE estimate runs k times per image.
# benchmarks/bench_layout.py measures both layouts in one run: CPU x1.3-1.4 (conv and deep_conv,
# MNIST); one H100 (10,000 MNIST test images, k = 1000) deep_conv 5.39 -> 2.33 s (x2.31), conv
# (32, 64) 1.85 -> 1.88 s (x0.98, within its run-to-run spread), metrics equal to 3e-5. A device
# not listed has not been measured and keeps PyTorch's channels-first default.
CHANNELS_LAST = ("cpu", "cuda")


def use_channels_last(model: AutoEncoder, on: bool = True) -> AutoEncoder:
    """Put a conv model's 4-d weights channels-last (or back to channels-first with `on=False`);
    convolutions then compute in that layout. A model without convolutions is left as it is. In
    place: the parameters stay the same objects with the same values."""
    if any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules()):
        model.to(memory_format=torch.channels_last if on else torch.contiguous_format)
    return model


@dataclass
class Codes:
    """Posterior means with their labels, what the clustering scores are computed from (numpy, so
    that they can be scored in another process)."""

    train_z: np.ndarray  # (N, K) the first probe_train_samples training images
    train_y: np.ndarray  # (N,)
    test_z: np.ndarray  # (M, K)
    test_y: np.ndarray  # (M,)
    num_classes: int


@dataclass
class Evaluation:
    metrics: dict[str, float]                        # metric name (no `test/` prefix) -> value
    kl_per_dim: list[float] = field(default_factory=list)
    not_applicable: tuple[str, ...] = ()
    codes: Codes | None = None  # set when the protocol scores clustering and they were not scored yet


class IWEstimate(NamedTuple):
    log_p: Tensor  # (B,) the IWAE estimate of log p(x)
    elbo: Tensor  # (B,) the k-sample Monte Carlo ELBO, mean_i log w_i
    kl: Tensor  # (B,) the k-sample estimate of KL(q(z|x) || p(z)), mean_i [log q(z_i|x) - log p(z_i)]


def importance_weighted(log_px: Callable[[Tensor], Tensor], mean: Tensor, logvar: Tensor, k: int,
                        per_chunk: int, generator: torch.Generator | None = None,
                        log_prior: Callable[[Tensor], Tensor] = log_normal_std) -> tuple[Tensor, Tensor]:
    """The IWAE estimate of log p(x) with k samples from q = N(mean, exp(logvar)), (B,), drawn
    `per_chunk` at a time; `log_px(z)` maps z (n, B, K) to log p(x|z) (n, B), `log_prior(z)` to
    log p(z) (n, B) (default N(0, I)).

    Also returns the k-sample Monte Carlo ELBO, mean_i log w_i, (B,): from the same samples, so
    that nll_iw <= -elbo holds exactly (Jensen), not only in expectation."""
    est = importance_weighted_estimate(log_px, mean, logvar, k, per_chunk, generator, log_prior)
    return est.log_p, est.elbo


def importance_weighted_estimate(log_px: Callable[[Tensor], Tensor], mean: Tensor, logvar: Tensor, k: int,
                                 per_chunk: int, generator: torch.Generator | None = None,
                                 log_prior: Callable[[Tensor], Tensor] = log_normal_std) -> IWEstimate:
    """`importance_weighted` with the KL estimate from the same samples."""
    running = None  # (B,) logsumexp of the log-weights so far
    total = mean.new_zeros(mean.shape[0])  # (B,) sum of the log-weights
    kl = mean.new_zeros(mean.shape[0])  # (B,) sum of log q - log p
    std = torch.exp(0.5 * logvar)
    for start in range(0, k, per_chunk):
        n = min(per_chunk, k - start)
        eps = torch.randn((n, *mean.shape), device=mean.device, dtype=mean.dtype, generator=generator)
        z = mean + std * eps  # (n, B, K)
        log_ratio = log_normal_diag(z, mean, logvar) - log_prior(z)  # (n, B) log q(z|x) - log p(z)
        log_w = log_px(z) - log_ratio  # (n, B)
        lse = torch.logsumexp(log_w, dim=0)
        running = lse if running is None else torch.logaddexp(running, lse)
        total += log_w.sum(0)
        kl += log_ratio.sum(0)
    return IWEstimate(running - math.log(k), total / k, kl / k)


def iw_nll(model: AutoEncoder, x: Tensor, settings: RunSettings, k: int, chunk: int = 50_000,
           generator: torch.Generator | None = None, posterior: Posterior | None = None) -> tuple[Tensor, Tensor]:
    """-log p(x) (IWAE, k samples) and the k-sample ELBO per image, (B,) each, under the model's
    own prior. At most `chunk` images are decoded at once, so memory stays bounded for any k and
    batch size. Pass the `posterior` of x when the caller has already encoded it."""
    est = iw_estimate(model, x, settings, k, chunk, generator, posterior)
    return -est.log_p, est.elbo


def iw_estimate(model: AutoEncoder, x: Tensor, settings: RunSettings, k: int, chunk: int = 50_000,
                generator: torch.Generator | None = None, posterior: Posterior | None = None) -> IWEstimate:
    """The importance-weighted estimates of `iw_nll` (log p(x), ELBO, KL), (B,) each."""
    post = posterior if posterior is not None else model.encode(x)
    b = x.shape[0]
    log_sigma = log_sigma_of(model, settings, x)
    nll_fn = LIKELIHOODS[settings.likelihood]

    def log_px(z: Tensor) -> Tensor:
        n = z.shape[0]
        logits = model.decode(z.reshape(n * b, -1)).unflatten(0, (n, b))  # (n, B, C, H, W)
        target = x.unsqueeze(0).expand(n, *x.shape)  # a view: the n copies of x are never written out
        return -nll_fn(logits, target, log_sigma).flatten(2).sum(2)  # (n, B)

    return importance_weighted_estimate(log_px, post.mean, post.logvar, k, max(1, chunk // b), generator,
                                        log_prior=model.log_prior)


@torch.inference_mode()
def encode_means(model: AutoEncoder, split: DeviceSplit, batch_size: int = 1000,
                 limit: int | None = None) -> Tensor:
    """Posterior means (N, K) of (the first `limit` images of) a split."""
    model.eval()
    out, seen = [], 0
    for x, _ in split.iter_batches(batch_size):
        out.append(model.encode(x).mean.float())
        seen += x.shape[0]
        if limit is not None and seen >= limit:
            break
    z = torch.cat(out)
    return z[:limit] if limit is not None else z


@torch.inference_mode()
def evaluate(model: AutoEncoder, test: DeviceSplit, settings: RunSettings,
             protocol: EvaluateSettings | None = None, *, train: DeviceSplit | None = None,
             num_classes: int | None = None, batch_size: int = 500, score: bool = True,
             channels_last: bool | None = None) -> Evaluation:
    """The whole protocol on `test`; clustering scores also need `train` (for the kNN and probe
    fits) and `num_classes`. With `score=False` the clustering scores are left out and the codes
    they need are returned instead (`Evaluation.codes`; `score_codes` scores them, on the CPU,
    where the caller likes: the runner does it in worker processes while the GPU trains on).
    A conv model is evaluated channels-last on the devices in CHANNELS_LAST (`channels_last`
    overrides that) and is left in that layout."""
    protocol = protocol or EvaluateSettings()
    model.eval()
    device = test.x.device
    use_channels_last(model, device.type in CHANNELS_LAST if channels_last is None else channels_last)
    gen = torch.Generator(device=device).manual_seed(EVAL_SEED)
    k = protocol.k_for(device.type)
    c, h, w = test.shape
    num_pixels = c * h * w
    sums = {"recon_mse": 0.0, "recon_bce": 0.0, "elbo": 0.0, "nll_iw": 0.0, "kl": 0.0,
            "noisy_recon_mse": 0.0, "noisy_recon_bce": 0.0}
    kl_dims, means, n = None, [], 0
    usage = None  # (num_codes,) how often each code was picked (discrete families)
    limit = protocol.max_test_samples
    for x, _ in test.iter_batches(batch_size):
        if limit is not None and n >= limit:
            break
        if limit is not None:
            x = x[:limit - n]
        post = model.encode(x)
        _recon_sums(sums, "", model.decode(post.mean), x, num_pixels)
        means.append(post.mean.float())
        if post.codes is not None:
            found = torch.bincount(post.codes.flatten(), minlength=model.num_codes)
            usage = found if usage is None else usage + found
        if model.denoising:  # how well it denoises: reconstruct the clean x from noisy input
            noisy = torch.clamp(x + model.noise * torch.randn(x.shape, device=device, generator=gen), 0.0, 1.0)
            _recon_sums(sums, "noisy_", model.decode(model.encode(noisy).mean), x, num_pixels)
        if model.stochastic:
            est = iw_estimate(model, x, settings, k, protocol.iw_chunk, gen, posterior=post)
            kl = model.kl_per_dim(post)  # (B, K), or None: no closed form under this prior
            if kl is not None:
                kl_dims = kl.sum(0) if kl_dims is None else kl_dims + kl.sum(0)
            sums["kl"] += est.kl.sum().item()
            sums["nll_iw"] -= est.log_p.sum().item()
            sums["elbo"] += est.elbo.sum().item()
        n += x.shape[0]

    metrics = {"recon_mse": sums["recon_mse"] / n, "recon_bce": sums["recon_bce"] / n}
    if model.denoising:
        metrics.update(noisy_recon_mse=sums["noisy_recon_mse"] / n, noisy_recon_bce=sums["noisy_recon_bce"] / n)
    if usage is not None:
        metrics.update(codebook_metrics(usage))
    mu = torch.cat(means)  # (N, K)
    codes = None
    not_applicable: tuple[str, ...] = () if model.stochastic else STOCHASTIC_ONLY
    if protocol.clustering and num_classes is not None and num_classes < 2:
        not_applicable += SCORE_KEYS  # labels of one class tell nothing: every score would be 1
    elif protocol.clustering and train is not None and num_classes:
        train_mu = encode_means(model, train, limit=protocol.probe_train_samples)
        codes = Codes(train_mu.cpu().numpy(), train.y[:len(train_mu)].cpu().numpy(), mu.cpu().numpy(),
                      test.y[:len(mu)].cpu().numpy(), num_classes)
        if score:
            metrics.update(score_codes(codes, protocol))
            codes = None
    if not model.stochastic:
        return Evaluation(metrics=metrics, not_applicable=not_applicable, codes=codes)
    per_dim = (kl_dims / n).tolist() if kl_dims is not None else []
    metrics.update({
        "elbo": sums["elbo"] / n,
        "bpd": -(sums["elbo"] / n) / (num_pixels * math.log(2)),
        "nll_iw": sums["nll_iw"] / n,
        "nll_iw_k": float(k),
        "kl": sum(per_dim) if per_dim else sums["kl"] / n,
        "active_units": float((mu.var(0) > ACTIVE_UNIT_THRESHOLD).sum().item()),
    })
    return Evaluation(metrics=metrics, kl_per_dim=per_dim, not_applicable=not_applicable, codes=codes)


def codebook_metrics(usage: Tensor) -> dict[str, float]:
    """Codebook usage from the count of each code over the test split (num_codes,): the perplexity
    exp(-sum_c p_c log p_c) (van den Oord et al. 2017's measure; num_codes when every code is used
    equally, 1 when one code does everything), the number of dead codes (never used), and the share
    of the codebook in use."""
    p = usage.double() / usage.sum()
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum()
    dead = int((usage == 0).sum())
    return {"codebook_perplexity": float(entropy.exp()), "dead_codes": float(dead),
            "codebook_usage": 1.0 - dead / len(usage)}


def score_codes(codes: Codes, protocol: EvaluateSettings) -> dict[str, float]:
    """The clustering scores of the protocol (vaebench.clustering) on a model's codes."""
    from vaebench.clustering import cluster_scores

    return cluster_scores(codes.train_z, codes.train_y, codes.test_z, codes.test_y, n_classes=codes.num_classes,
                          seed=EVAL_SEED, kmeans_restarts=protocol.kmeans_restarts,
                          silhouette_samples=protocol.silhouette_samples, knn_neighbors=protocol.knn_neighbors)


def _recon_sums(sums: dict[str, float], prefix: str, logits: Tensor, x: Tensor, num_pixels: int) -> None:
    sums[prefix + "recon_mse"] += F.mse_loss(torch.sigmoid(logits), x, reduction="sum").item() / num_pixels
    sums[prefix + "recon_bce"] += F.binary_cross_entropy_with_logits(logits, x, reduction="sum").item()


# --- the dataset's raw-pixel baseline ----------------------------------------------------------

_BASELINES: dict[str, dict[str, float]] = {}


def pixel_baseline(train: DeviceSplit, test: DeviceSplit, num_classes: int, protocol: EvaluateSettings,
                   cache_key: str, cache_dir=None) -> dict[str, float]:
    """The clustering scores on raw pixels: what a latent space should beat. Computed once per
    dataset, preprocessing and protocol (`cache_key`), then cached in memory and, when
    `cache_dir` is given, as a JSON file there (shared by reruns and parallel workers)."""
    import json
    from pathlib import Path

    from vaebench.clustering import cluster_scores

    if cache_key in _BASELINES:
        return _BASELINES[cache_key]
    path = Path(cache_dir) / f"baseline-{cache_key}.json" if cache_dir else None
    if path is not None and path.exists():
        try:
            _BASELINES[cache_key] = json.loads(path.read_text())
            return _BASELINES[cache_key]
        except (OSError, ValueError):
            pass  # a torn file from a crashed writer: recompute
    limit_train = protocol.probe_train_samples
    limit_test = protocol.max_test_samples

    def pixels(split: DeviceSplit, limit: int | None):
        xs = torch.cat([x.flatten(1).cpu() for x, _ in split.iter_batches(2000)])
        y = split.y.cpu()
        return (xs[:limit], y[:limit]) if limit else (xs, y)

    tx, ty = pixels(train, limit_train)
    sx, sy = pixels(test, limit_test)
    scores = cluster_scores(tx.numpy(), ty.numpy(), sx.numpy(), sy.numpy(), n_classes=num_classes,
                            seed=EVAL_SEED, kmeans_restarts=protocol.kmeans_restarts,
                            silhouette_samples=protocol.silhouette_samples, knn_neighbors=protocol.knn_neighbors)
    _BASELINES[cache_key] = scores
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{id(scores)}.tmp")
            tmp.write_text(json.dumps(scores))
            tmp.replace(path)  # atomic: parallel workers never read half a file
        except OSError:
            pass  # a read-only data dir only costs the recomputation
    return scores
