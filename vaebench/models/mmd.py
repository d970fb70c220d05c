"""The kernel options shared by the families with an MMD regulariser (`wae_mmd`, `info_vae`):
which kernel compares the codes with prior samples, at which scales (losses.mmd)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat

Kernel = Literal["imq", "rbf"]


class MMDOptions(BaseModel):
    """kernel: `imq` (inverse multiquadratic, Tolstikhin et al.'s choice) or `rbf` (Gaussian).
    scales: the kernel is summed over these multiples s of its base width C = 2 K (K the latent
    size): C = 2 K s each. The kernel and its scales are shared by a pack; the weights are not."""

    model_config = ConfigDict(extra="forbid")

    kernel: Kernel = "imq"
    scales: list[PositiveFloat] = Field(default=[0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0], min_length=1)
