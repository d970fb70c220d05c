"""The training loop: device, optimiser, epochs, validation, early stopping, checkpoints, resume.

`train` knows nothing of MLflow: after every epoch it hands the epoch's metrics and a full
checkpoint (model + optimiser + epoch + RNG state + history) to `on_epoch_end`, which the runner
uses to log and persist, and Optuna to prune. Passing that checkpoint back as `resume` continues
the run exactly where it stopped.

This is the plain loop: one model, eager, the reference. The packed engine (vaebench.packed) trains
a group of runs as one stacked model and captures its step in a CUDA graph; it shares with this
module the step (vaebench.step), the per-run bookkeeping (`Record`: epochs, history, early
stopping) and the checkpoint format, so either can resume what the other started.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch
from torch import Tensor

from vaebench.batches import DeviceSplit, to_device
from vaebench.config import RunSettings
from vaebench.data import Dataset
from vaebench.losses import effective_beta, kl_anneal_weight, reduction_scale
from vaebench.models import AutoEncoder, build_model
from vaebench.step import VAL_SEED, Streams, draw_noise, fixed_log_sigma, loss_and_sums

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
EpochCallback = Callable[[int, dict[str, float], dict[str, Any]], None]
VAL_BATCH = 1024

class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; `epoch` is where (recorded on the run)."""

    def __init__(self, message: str, epoch: int | None = None):
        super().__init__(message)
        self.epoch = epoch

    def __reduce__(self) -> tuple:  # keeps `epoch` across processes (--jobs workers)
        return (type(self), (str(self), self.epoch))


class DeviceUnavailable(RuntimeError):
    """A run asks for a device this machine does not have."""


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA when present, else Apple MPS, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {name!r} requested but CUDA is not available here; use device: auto "
                                "(the GPU when there is one, else the CPU) or cpu")
    return device


def float32_math(device: torch.device) -> str:
    """How float32 products run on `device` under torch's current settings (a run tag): on CUDA,
    cuDNN's convolutions default to TF32 (inputs rounded to 10-bit mantissas) while matrix products
    stay fp32 unless `torch.set_float32_matmul_precision` says otherwise."""
    if device.type != "cuda":
        return "fp32"
    matmul = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    conv = "tf32" if torch.backends.cudnn.enabled and torch.backends.cudnn.allow_tf32 else "fp32"
    return matmul if matmul == conv else f"matmul {matmul}, convolutions {conv}"


@dataclass
class TrainResult:
    model: AutoEncoder
    history: list[dict[str, float]]  # one dict per epoch: train/* and val/* metrics
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    train_seconds: float
    device: torch.device
    how: dict[str, str] = field(default_factory=dict)  # how it was trained (engine, step, pack): run tags


def build_for(settings: RunSettings, shape: tuple[int, int, int]) -> AutoEncoder:
    return build_model(settings.model, settings.arch, in_shape=shape, latent_dim=settings.latent_dim,
                       arch_options=settings.arch_config, noise=settings.noise,
                       learn_sigma=settings.likelihood == "gaussian" and settings.gaussian_sigma == "learned",
                       family_options=settings.family_config, prior=settings.prior.kind,
                       pseudo_inputs=settings.prior.pseudo_inputs)


def dataset_for(settings: RunSettings, data_dir: str | os.PathLike,
                base_dir: str | os.PathLike | None = None) -> Dataset:
    """The dataset a run trains on, with its validation split (`val_fraction`) carved out; a relative
    path in its options is taken relative to `base_dir` (the experiments file's folder)."""
    from vaebench.data import load_dataset

    return load_dataset(settings.dataset, data_dir, val_fraction=settings.val_fraction, options=settings.data_config,
                        base_dir=base_dir)


def splits_for(settings: RunSettings, data: Dataset, device: torch.device) -> tuple[DeviceSplit, DeviceSplit]:
    """The training and validation splits of a run on `device`, preprocessed as the run says (under
    dynamic binarization both draw per batch: training from the run's stream, validation from a
    fixed-seed generator, `validate`)."""
    opts = dict(image_size=settings.image_size, binarization=settings.binarization, fresh=True)
    return (to_device(data.train, device, limit=settings.max_train_samples, **opts),
            to_device(data.val, device, **opts))


def num_batches(n: int, batch_size: int) -> int:
    return max(1, -(-n // batch_size))


@dataclass
class Record:
    """What one run's training has done so far, whatever trained it: the engine-independent part
    of a checkpoint (the checkpoint adds model, optimizer and rng)."""

    epoch: int = -1  # last finished epoch
    history: list[dict[str, float]] = field(default_factory=list)
    best_val: float = math.inf
    best_epoch: int = -1
    best_model: dict[str, Tensor] | None = None  # CPU copy of the weights of the best epoch
    bad_epochs: int = 0
    train_seconds: float = 0.0
    stopped_early: bool = False

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> Record:
        # a copy, as `checkpoint` gives one: the history grows in place, the caller's dict must not
        return cls(**copy.deepcopy({f.name: checkpoint[f.name] for f in fields(cls)}))

    def checkpoint(self) -> dict[str, Any]:
        return copy.deepcopy({f.name: getattr(self, f.name) for f in fields(self)})

    def done(self, settings: RunSettings) -> bool:
        return self.stopped_early or self.epoch + 1 >= settings.epochs

    def end_epoch(self, epoch: int, metrics: dict[str, float], seconds: float, settings: RunSettings) -> bool:
        """Book a finished epoch; True when it is the best so far (the caller keeps its weights).

        Early stopping on the full objective; the warm-up epochs do not count against patience
        (the objective itself changes while the KL weight ramps up)."""
        anneal = settings.kl_anneal
        best = metrics["val/loss"] < self.best_val
        if best:
            self.best_val, self.best_epoch, self.bad_epochs = metrics["val/loss"], epoch, 0
        elif epoch + 1 > anneal.epochs or anneal.schedule == "none":
            self.bad_epochs += 1
        if settings.patience is not None and self.bad_epochs >= settings.patience:
            self.stopped_early = True
        self.epoch = epoch
        self.train_seconds += seconds
        self.history.append(metrics)
        return best


def lr_at(settings: RunSettings, epoch: int) -> float:
    """The learning rate of `epoch` under the run's lr_schedule (config.LRSchedule): a function of
    the epoch alone, set at the start of each epoch by both trainers, so resuming needs no state."""
    sched = settings.lr_schedule
    if sched.kind == "step":
        return settings.lr * sched.gamma ** (epoch // sched.step_size)
    if sched.kind == "cosine":
        return settings.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / settings.epochs))
    if sched.kind == "geometric":  # stage i covers epochs [(g^i - 1) / (g - 1), (g^(i+1) - 1) / (g - 1))
        stage, end, length = 0, sched.growth ** 0, 1
        while epoch >= end:
            stage, length = stage + 1, length * sched.growth
            end += length
        return settings.lr * sched.gamma ** stage
    return settings.lr


def kl_weights(settings: RunSettings, epoch: int, n_batches: int) -> list[float]:
    """The KL annealing factor at each step of `epoch`, then at its end (n_batches + 1 values)."""
    a = settings.kl_anneal
    return [kl_anneal_weight(a.schedule, epoch + b / n_batches, a.epochs, a.cycles, a.ratio)
            for b in range(n_batches)] + [kl_anneal_weight(a.schedule, epoch + 1, a.epochs, a.cycles, a.ratio)]


def epoch_metrics(sums: list[float], n: int, end_weight: float, eff_beta: float, epoch: int,
                  settings: RunSettings) -> dict[str, float]:
    """train/* metrics of an epoch from the summed (loss, recon, kl) over its n samples; raises
    TrainingDiverged when they are not finite."""
    loss, recon, kl = (v / n for v in sums)
    if not all(map(math.isfinite, (loss, recon, kl))):
        raise TrainingDiverged(f"training loss is not finite at epoch {epoch} ({loss}); "
                               f"try a smaller lr than {settings.lr}", epoch)
    return {"train/loss": loss, "train/recon": recon, "train/kl": kl,
            "train/kl_weight": end_weight, "train/effective_beta": eff_beta * end_weight,
            "train/lr": lr_at(settings, epoch)}


def _start(settings: RunSettings, data: Dataset, device: torch.device) -> tuple[Streams, DeviceSplit, DeviceSplit,
                                                                               AutoEncoder, torch.optim.Optimizer]:
    """A run before its first epoch: its random streams, splits, initialised model and optimiser."""
    torch.manual_seed(settings.seed)  # the initialisation; every later draw comes from `streams`
    streams = Streams(settings.seed, device)
    train_split, val_split = splits_for(settings, data, device)
    model = build_for(settings, train_split.shape).to(device)
    model.set_dataset_size(len(train_split))
    optimizer = OPTIMIZERS[settings.optimizer](model.parameters(), lr=settings.lr,
                                               weight_decay=settings.weight_decay)
    return streams, train_split, val_split, model, optimizer


def _checkpoint(record: Record, model: AutoEncoder, optimizer: torch.optim.Optimizer,
                streams: Streams) -> dict[str, Any]:
    return {**record.checkpoint(), "model": _cpu_copy(model.state_dict()),
            "optimizer": copy.deepcopy(optimizer.state_dict()), "rng": streams.get_state()}


def initial_checkpoint(settings: RunSettings, data: Dataset) -> dict[str, Any]:
    """The checkpoint of a run before its first epoch: resuming from it trains the run exactly as
    from scratch (benchmarks/bench_twins.py branches twins there)."""
    streams, _, _, model, optimizer = _start(settings, data, resolve_device(settings.device))
    return _checkpoint(Record(), model, optimizer, streams)


def train(settings: RunSettings, data: Dataset, *, resume: dict[str, Any] | None = None,
          on_epoch_end: EpochCallback | None = None, progress: bool = True,
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train `settings` on `data` (continuing `resume`, a checkpoint from `on_epoch_end`).
    `should_stop` is polled before every batch: when it says so, KeyboardInterrupt is raised there,
    at a clean point (a graceful Ctrl-C), and the run continues from its last checkpoint later."""
    from tqdm.auto import tqdm

    device = resolve_device(settings.device)
    streams, train_split, val_split, model, optimizer = _start(settings, data, device)
    shape = train_split.shape
    num_pixels = math.prod(shape)
    eff_beta = effective_beta(settings.beta, settings.reduction, num_pixels)
    recon_scale = reduction_scale(settings.reduction, num_pixels)
    log_sigma = fixed_log_sigma(settings, device)
    dynamic = train_split.binarization == "dynamic" and not train_split.binary

    record = Record()
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(copy.deepcopy(resume["optimizer"]))  # it updates its state in place
        streams.set_state(resume["rng"])
        record = Record.from_checkpoint(resume)

    n, batch_size = len(train_split), settings.batch_size
    n_batches = num_batches(n, batch_size)
    first = record.epoch + 1
    bar = tqdm(range(first, settings.epochs), desc="epochs", unit="ep", leave=False,
               disable=not progress, initial=first, total=settings.epochs)
    for epoch in bar:
        if record.stopped_early:
            break
        t0 = time.perf_counter()
        model.train()
        sums = torch.zeros(3, device=device)  # loss, recon, kl summed over samples
        weights = kl_weights(settings, epoch, n_batches)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(settings, epoch)
        perm = streams.permutation(n, device)
        for b in range(n_batches):
            if should_stop is not None and should_stop():
                raise KeyboardInterrupt("stop requested")
            index = perm[b * batch_size:(b + 1) * batch_size]
            noise = draw_noise(model, streams.noise, len(index), shape, dynamic=dynamic)
            x = train_split.batch(index, noise.uniform)  # (B, C, H, W) in [0, 1]
            loss, batch_sums = loss_and_sums(model, x, noise, likelihood=settings.likelihood,
                                             recon_scale=recon_scale, kl_coef=settings.beta * weights[b],
                                             log_sigma=log_sigma)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += batch_sums.detach()
        metrics = epoch_metrics(sums.tolist(), n, weights[-1], eff_beta, epoch, settings)
        metrics.update(validate(model, val_split, settings))
        seconds = time.perf_counter() - t0
        metrics["train/epoch_seconds"] = seconds
        if record.end_epoch(epoch, metrics, seconds, settings):
            record.best_model = _cpu_copy(model.state_dict())
        bar.set_postfix(loss=f"{metrics['train/loss']:.3g}", val=f"{metrics['val/loss']:.3g}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics, _checkpoint(record, model, optimizer, streams))
    bar.close()

    if record.best_model is not None:
        model.load_state_dict(record.best_model)
    model.eval()
    return TrainResult(model=model, history=record.history, best_epoch=record.best_epoch,
                       epochs_run=record.epoch + 1, stopped_early=record.stopped_early,
                       train_seconds=record.train_seconds, device=device,
                       # none when no epoch was trained here (resumed after its last one): the
                       # run keeps the tags of the attempt that trained it
                       how={"vaebench.engine": "plain", "vaebench.step": "eager"} if record.epoch >= first else {})


@torch.no_grad()
def validate(model: AutoEncoder, split: DeviceSplit, settings: RunSettings,
             batch_size: int | None = None) -> dict[str, float]:
    """The run's own objective at full KL weight on the validation split, plus -ELBO for VAEs.
    Its noise comes from a fixed-seed generator: every epoch and every run see the same draws."""
    batch_size = batch_size or val_batch(model)
    model.eval()
    device = split.x.device
    generator = torch.Generator(device=device).manual_seed(VAL_SEED)
    dynamic = split.binarization == "dynamic" and not split.binary
    recon_scale = reduction_scale(settings.reduction, math.prod(split.shape))
    log_sigma = fixed_log_sigma(settings, device)
    sums = torch.zeros(3, device=device)
    for start in range(0, len(split), batch_size):
        index = torch.arange(start, min(start + batch_size, len(split)), device=device)
        noise = draw_noise(model, generator, len(index), split.shape, dynamic=dynamic)
        _, batch_sums = loss_and_sums(model, split.batch(index, noise.uniform), noise,
                                      likelihood=settings.likelihood, recon_scale=recon_scale,
                                      kl_coef=settings.beta, log_sigma=log_sigma)
        sums += batch_sums
    return val_metrics(sums.tolist(), len(split), model.stochastic)


def val_batch(model: AutoEncoder) -> int:
    """Images per validation batch: VAL_BATCH decoded images (iwae decodes k per image)."""
    return max(1, VAL_BATCH // model.samples_per_image)


def val_metrics(sums: list[float], n: int, stochastic: bool) -> dict[str, float]:
    loss, recon, kl = (v / n for v in sums)
    metrics = {"val/loss": loss, "val/recon": recon, "val/kl": kl}
    if stochastic:
        metrics["val/neg_elbo"] = recon + kl
    return metrics


def _cpu_copy(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}
