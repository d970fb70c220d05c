"""From the cells to train to work units: which cells can share a stacked step, and how many of
them one device trains at once.

A unit is what one device trains at once: a pack of cells (vaebench.packed) or a single cell.
Cells can share a step when they agree on everything that fixes its shapes and its data (the
pack key); the settings in PER_MEMBER may differ, each member keeps its own, and so may the family
options each family lists in its `Options.PER_MEMBER` (scalar weights such as beta_tcvae's alpha,
beta, gamma; the model holds them as buffers, stacked with the rest). Options that fix shapes or
code paths (iwae's k, vq_vae's codebook size, a kernel) are shared. Packing is chosen
per invocation (`--pack auto | off | N`): `auto` packs on CUDA, where it pays (one small model
uses a fraction of a GPU), and not on the CPU (measured 0.88x there: vmap's overhead and no idle
hardware to fill).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vaebench.config import RunSettings

if TYPE_CHECKING:
    import torch

    from vaebench.data import Dataset

# Settings each member of a pack keeps as its own (everything else must be equal).
PER_MEMBER = ("beta", "reduction", "likelihood", "gaussian_sigma", "kl_anneal", "lr", "lr_schedule", "weight_decay",
              "optimizer", "seed", "noise", "patience")
AUTO_MAX_MEMBERS = 32  # `--pack auto`: at most this many cells per unit (the memory bound may say fewer)
MEMORY_FRACTION = 0.5  # of the device's free memory, for the members of one unit (estimated per member)


def pack_key(settings: RunSettings) -> str:
    """Equal for cells that can be trained as one stacked model."""
    from vaebench.models import FAMILIES

    shared = settings.model_dump(mode="json", exclude=set(PER_MEMBER))
    own = FAMILIES[settings.model].Options.PER_MEMBER
    shared["family_options"] = {m: {k: v for k, v in o.items() if k not in own}
                                for m, o in shared["family_options"].items()}
    # a learned Gaussian sigma is a parameter of the model: part of its shape
    shared["learned_sigma"] = settings.likelihood == "gaussian" and settings.gaussian_sigma == "learned"
    return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:12]


def parse_pack(value: str) -> str | int:
    """`--pack`: auto | off | N (N >= 1; 1 means off)."""
    if value in ("auto", "off"):
        return value
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"--pack {value!r}: expected auto, off or a number of cells >= 1") from None
    if n < 1:
        raise ValueError(f"--pack {value!r}: expected auto, off or a number of cells >= 1")
    return n


def pack_limit(pack: str | int, device_type: str) -> int:
    """The most cells per unit that `--pack` allows on this kind of device."""
    if pack == "off":
        return 1
    if pack == "auto":
        return AUTO_MAX_MEMBERS if device_type == "cuda" else 1
    return int(pack)


@dataclass
class Unit:
    """Cells trained together; `items` are the caller's (e.g. (RunSpec, run id to resume))."""

    key: str
    items: list[Any] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)


def make_units(items: list[Any], settings_of, limit: int) -> list[Unit]:
    """Group `items` by pack key in the order they come (file order), each group cut into units of
    at most `limit` items, balanced (9 cells with limit 8 make 5 + 4, not 8 + 1)."""
    groups: dict[str, list[Any]] = {}
    for item in items:
        groups.setdefault(pack_key(settings_of(item)) if limit > 1 else str(len(groups)), []).append(item)
    units = []
    for key, members in groups.items():
        n = math.ceil(len(members) / max(1, limit))
        size = math.ceil(len(members) / n)
        units += [Unit(key, members[i:i + size]) for i in range(0, len(members), size)]
    return units


def member_bytes(settings: RunSettings, shape: tuple[int, int, int]) -> int:
    """Estimated device memory of one member of a pack at its peak, while its step is captured:
    10x the parameters (the parameters and two Adam moments; the copy of those three that the
    capture keeps to undo its warm-up steps; the gradients and the update's three temporaries of
    their size, the gradients gathered into the flat layout, the denominator and the step:
    vaebench.packed), plus the activations of a batch (kept for the backward pass, their
    gradients, and temporaries: 3x), found by running the model on the `meta` device."""
    import torch

    from vaebench.train import build_for

    model = build_for(settings, shape).to("meta")
    sizes: list[int] = []

    def record(module: Any, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel())

    for module in model.modules():
        if not list(module.children()):
            module.register_forward_hook(record)
    b = settings.batch_size
    eps_shape = model.eps_shape(b)
    with torch.no_grad():
        model(torch.empty(b, *shape, device="meta"),
              None if eps_shape is None else torch.empty(eps_shape, device="meta"))
    params = sum(p.numel() for p in model.parameters())
    inputs = 3 * b * math.prod(shape)  # the batch, its binarization and corruption noise
    return 4 * (10 * params + 3 * sum(sizes) + inputs)


def memory_cap(settings: RunSettings, data: Dataset, device: torch.device) -> int:
    """How many members of this pack the device's free memory holds (MEMORY_FRACTION of it)."""
    import torch

    c, h, w = data.shape
    shape = (c, settings.image_size, settings.image_size) if settings.image_size else (c, h, w)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int(MEMORY_FRACTION * free // member_bytes(settings, shape)))
