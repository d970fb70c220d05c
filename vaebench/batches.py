"""From a dataset's uint8 splits to float batches on the training device.

The splits are moved to the device once (as uint8: 4x smaller than float) and every batch is
normalised to [0, 1], resized and binarized on the fly there.

binarization:
  none     grey levels in [0, 1]
  static   one fixed Bernoulli draw per image, the same for every run (seed 0) and every epoch
           (Larochelle & Murray 2011); drawn once per split after resizing
  dynamic  a fresh Bernoulli draw per batch (Salakhutdinov & Murray 2008) of the training and
           validation splits (validation from a fixed-seed generator); the splits of the
           evaluation protocol (test, the probes' training images, the raw-pixel baseline) are
           drawn once, as static: every run is scored on the same binary images
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from vaebench.data import Split

STATIC_BINARIZATION_SEED = 0


@dataclass
class DeviceSplit:
    """One split held on the device. `x` is uint8 (N, C, H, W); `binary` means it is already
    statically binarized at the target size."""

    x: Tensor
    y: Tensor
    image_size: int | None
    binarization: str
    binary: bool = False

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.x.shape[1:]
        s = self.image_size
        return (c, s, s) if s and not self.binary else (c, h, w)

    def batch(self, index: Tensor, uniform: Tensor | None = None) -> Tensor:
        """Float batch in [0, 1], (B, C, S, S), on the split's device. Dynamic binarization thresholds
        `uniform` (U(0, 1) draws of the batch's shape: the trainer's, from the run's own stream), or
        draws from torch's global generator when none is given (evaluation, figures)."""
        x = self.x[index].float().div_(255.0)
        if self.binary:
            return x
        x = resize(x, self.image_size)
        if self.binarization == "dynamic":
            x = torch.bernoulli(x) if uniform is None else (uniform < x).to(x.dtype)
        return x

    def iter_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Sequential (x, y) batches over the whole split (evaluation order)."""
        for start in range(0, len(self), batch_size):
            index = torch.arange(start, min(start + batch_size, len(self)), device=self.x.device)
            yield self.batch(index), self.y[index]


def resize(x: Tensor, size: int | None) -> Tensor:
    if size is None or (x.shape[-2] == size and x.shape[-1] == size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).clamp_(0.0, 1.0)


def to_device(split: Split, device: torch.device, *, image_size: int | None, binarization: str,
              limit: int | None = None, fresh: bool = False) -> DeviceSplit:
    """The split on `device`. Dynamic binarization draws per batch only with `fresh` (training and
    validation); otherwise the split is binarized once, as static."""
    x, y = split.x, split.y
    if limit is not None:
        x, y = x[:limit], y[:limit]
    ds = DeviceSplit(x.to(device), y.to(device), image_size, binarization)
    if binarization == "static" or (binarization == "dynamic" and not fresh):
        ds = _binarize_statically(ds)
    return ds


def _binarize_statically(ds: DeviceSplit, chunk: int = 4096) -> DeviceSplit:
    gen = torch.Generator(device="cpu").manual_seed(STATIC_BINARIZATION_SEED)
    out = []
    for start in range(0, len(ds), chunk):
        x = resize(ds.x[start:start + chunk].float().div(255.0), ds.image_size).cpu()
        out.append((torch.bernoulli(x, generator=gen) * 255).to(torch.uint8))
    return DeviceSplit(torch.cat(out).to(ds.x.device), ds.y, ds.image_size, "static", binary=True)
