"""The training loop: device, optimiser, epochs, validation, early stopping, checkpoints, resume.

`train` knows nothing of MLflow: after every epoch it hands the epoch's metrics and a full
checkpoint (model + optimiser + epoch + RNG state + history) to `on_epoch_end`, which the runner
uses to log and persist, and Optuna to prune. Passing that checkpoint back as `resume` continues
the run exactly where it stopped.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from vaebench.batches import DeviceSplit, to_device
from vaebench.config import RunSettings
from vaebench.data import Dataset
from vaebench.losses import effective_beta, kl_anneal_weight, objective
from vaebench.models import AutoEncoder, build_model

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
EpochCallback = Callable[[int, dict[str, float], dict[str, Any]], None]


class TrainingDiverged(RuntimeError):
    pass


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA when present, else Apple MPS, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available here; use device: auto or cpu")
    return device


@dataclass
class TrainResult:
    model: AutoEncoder
    history: list[dict[str, float]]  # one dict per epoch: train/* and val/* metrics
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    train_seconds: float
    device: torch.device


def build_for(settings: RunSettings, shape: tuple[int, int, int]) -> AutoEncoder:
    return build_model(settings.model, settings.arch, in_shape=shape, latent_dim=settings.latent_dim,
                       arch_options=settings.arch_config, noise=settings.noise,
                       learn_sigma=settings.likelihood == "gaussian" and settings.gaussian_sigma == "learned")


def log_sigma_of(model: AutoEncoder, settings: RunSettings, like: Tensor) -> Tensor | None:
    """The Gaussian likelihood's log std-dev: learned, fixed, or None for Bernoulli."""
    if settings.likelihood != "gaussian":
        return None
    if model.log_sigma is not None:
        return model.log_sigma
    return like.new_tensor(float(settings.gaussian_sigma)).log()


def train(settings: RunSettings, data: Dataset, *, resume: dict[str, Any] | None = None,
          on_epoch_end: EpochCallback | None = None, progress: bool = True,
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train `settings` on `data` (continuing `resume`, a checkpoint from `on_epoch_end`).
    `should_stop` is polled before every batch: when it says so, KeyboardInterrupt is raised there,
    at a clean point (a graceful Ctrl-C), and the run continues from its last checkpoint later."""
    from tqdm.auto import tqdm

    device = resolve_device(settings.device)
    torch.manual_seed(settings.seed)
    shuffle_gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    noise_gen = torch.Generator(device=device).manual_seed(settings.seed + 1)

    opts = dict(image_size=settings.image_size, binarization=settings.binarization)
    train_split = to_device(data.train, device, limit=settings.max_train_samples, **opts)
    val_split = to_device(data.val, device, **opts)
    model = build_for(settings, train_split.shape).to(device)
    optimizer = OPTIMIZERS[settings.optimizer](model.parameters(), lr=settings.lr,
                                               weight_decay=settings.weight_decay)
    num_pixels = train_split.shape[0] * train_split.shape[1] * train_split.shape[2]
    eff_beta = effective_beta(settings.beta, settings.reduction, num_pixels)

    state: dict[str, Any] = {"epoch": -1, "history": [], "best_val": float("inf"), "best_epoch": -1,
                             "best_model": None, "bad_epochs": 0, "train_seconds": 0.0, "stopped_early": False}
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        _set_rng(resume["rng"], shuffle_gen, noise_gen)
        state.update({k: resume[k] for k in state})

    anneal = settings.kl_anneal
    n_batches = max(1, -(-len(train_split) // settings.batch_size))
    first = state["epoch"] + 1
    bar = tqdm(range(first, settings.epochs), desc="epochs", unit="ep", leave=False,
               disable=not progress, initial=first, total=settings.epochs)
    for epoch in bar:
        if state["stopped_early"]:
            break
        t0 = time.perf_counter()
        model.train()
        sums = torch.zeros(3, device=device)  # loss, recon, kl summed over samples
        perm = torch.randperm(len(train_split), generator=shuffle_gen).to(device)
        for b in range(n_batches):
            if should_stop is not None and should_stop():
                raise KeyboardInterrupt("stop requested")
            index = perm[b * settings.batch_size:(b + 1) * settings.batch_size]
            x = train_split.batch(index, noise_gen)  # (B, C, H, W) in [0, 1]
            weight = kl_anneal_weight(anneal.schedule, epoch + b / n_batches, anneal.epochs,
                                      anneal.cycles, anneal.ratio)
            out = model(model.corrupt(x))
            terms = objective(out.logits, x, out.posterior.mean, out.posterior.logvar,
                              likelihood=settings.likelihood, reduction=settings.reduction,
                              beta=settings.beta, kl_weight=weight,
                              log_sigma=log_sigma_of(model, settings, x))
            loss = terms.loss.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                sums += torch.stack([terms.loss.sum(), terms.recon.sum(), terms.kl.sum()])
        sums = (sums / len(train_split)).tolist()
        if not all(map(_finite, sums)):
            raise TrainingDiverged(f"training loss is not finite at epoch {epoch} ({sums[0]}); "
                                   f"try a smaller lr than {settings.lr}")
        end_weight = kl_anneal_weight(anneal.schedule, epoch + 1, anneal.epochs, anneal.cycles, anneal.ratio)
        metrics = {"train/loss": sums[0], "train/recon": sums[1], "train/kl": sums[2],
                   "train/kl_weight": end_weight, "train/effective_beta": eff_beta * end_weight}
        metrics.update(validate(model, val_split, settings))
        state["train_seconds"] += time.perf_counter() - t0
        metrics["train/epoch_seconds"] = time.perf_counter() - t0

        # Early stopping on the full objective; the warm-up epochs do not count against patience
        # (the objective itself changes while the KL weight ramps up).
        if metrics["val/loss"] < state["best_val"]:
            state.update(best_val=metrics["val/loss"], best_epoch=epoch, bad_epochs=0,
                         best_model=_cpu_copy(model.state_dict()))
        elif epoch + 1 > anneal.epochs or anneal.schedule == "none":
            state["bad_epochs"] += 1
        if settings.patience is not None and state["bad_epochs"] >= settings.patience:
            state["stopped_early"] = True
        state["epoch"] = epoch
        state["history"].append(metrics)
        bar.set_postfix(loss=f"{metrics['train/loss']:.3g}", val=f"{metrics['val/loss']:.3g}")
        if on_epoch_end is not None:
            checkpoint = {**copy.deepcopy(state), "model": _cpu_copy(model.state_dict()),
                          "optimizer": copy.deepcopy(optimizer.state_dict()), "rng": _get_rng(shuffle_gen, noise_gen)}
            on_epoch_end(epoch, metrics, checkpoint)
    bar.close()

    if state["best_model"] is not None:
        model.load_state_dict(state["best_model"])
    model.eval()
    return TrainResult(model=model, history=state["history"], best_epoch=state["best_epoch"],
                       epochs_run=state["epoch"] + 1, stopped_early=state["stopped_early"],
                       train_seconds=state["train_seconds"], device=device)


@torch.no_grad()
def validate(model: AutoEncoder, split: DeviceSplit, settings: RunSettings,
             batch_size: int = 1024) -> dict[str, float]:
    """The run's own objective at full KL weight on the validation split, plus -ELBO for VAEs."""
    model.eval()
    sums = torch.zeros(3, device=split.x.device)
    for x, _ in split.iter_batches(batch_size):
        out = model(model.corrupt(x))
        terms = objective(out.logits, x, out.posterior.mean, out.posterior.logvar,
                          likelihood=settings.likelihood, reduction=settings.reduction, beta=settings.beta,
                          log_sigma=log_sigma_of(model, settings, x))
        sums += torch.stack([terms.loss.sum(), terms.recon.sum(), terms.kl.sum()])
    loss, recon, kl = (sums / len(split)).tolist()
    metrics = {"val/loss": loss, "val/recon": recon, "val/kl": kl}
    if model.stochastic:
        metrics["val/neg_elbo"] = recon + kl
    return metrics


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


def _cpu_copy(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


def _get_rng(shuffle_gen: torch.Generator, noise_gen: torch.Generator) -> dict[str, Any]:
    rng = {"torch": torch.get_rng_state(), "shuffle": shuffle_gen.get_state(), "noise": noise_gen.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng(rng: dict[str, Any], shuffle_gen: torch.Generator, noise_gen: torch.Generator) -> None:
    torch.set_rng_state(rng["torch"])
    shuffle_gen.set_state(rng["shuffle"])
    noise_gen.set_state(rng["noise"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
