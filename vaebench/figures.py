"""The figures of one run: learning curves, reconstructions, samples, latent space, interpolations.

Every drawing function takes plain arrays/tensors and returns a `matplotlib.figure.Figure` bound to
an Agg canvas. Figures are built with `Figure()` rather than pyplot, so nothing touches global
state: no backend switch, no display, no pyplot figure registry to leak into (a figure is freed
when its last reference goes). matplotlib, PIL and scikit-learn are imported inside the functions:
importing this module stays cheap.

`draw_run_figures` draws them all for a trained model on its test split and writes the FIGURES
files (those that apply to the model) into one directory.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:  # annotations only: the imports cost ~0.3 s
    from matplotlib.figure import Figure

    from vaebench.batches import DeviceSplit
    from vaebench.models import AutoEncoder

FIGURES = (
    "learning_curves.png",
    "reconstructions.png",
    "samples.png",  # generative families only (model.generative): an AE has no prior to sample
    "latent_scatter.png",
    "latent_grid.png",  # 2-dim latents only
    "interpolation.png",
    "interpolation.gif",
)
DPI = 100  # small files (tens of kB) that are still sharp at report size
N_RECONSTRUCTIONS = 8
N_SAMPLES = 16
GRID_SIZE = 15  # latent_grid.png: GRID_SIZE x GRID_SIZE decoded images
GRID_SPAN = 3.0  # ... over [-GRID_SPAN, GRID_SPAN]^2, +-3 prior std-devs
INTERPOLATION_STEPS = 10
GIF_MIN_SIZE = 160  # px: GIF frames are upscaled (nearest) to at least this height
GIF_FRAME_MS = 120
ENCODE_BATCH = 512
PROJECTIONS = ("pca", "tsne")  # latent_scatter.png beyond 2 dims
TSNE_POINTS = 1000  # t-SNE's subsample (seeded)
TSNE_PERPLEXITY = 30.0

# The mean of p(x|z) as an image, from the decoder's logits. Both likelihoods decode through a
# sigmoid (the Gaussian's mean is squashed into [0, 1] too), so both show sigmoid(logits).
LIKELIHOOD_MEANS = {
    "bernoulli": torch.sigmoid,
    "gaussian": torch.sigmoid,
}

# learning_curves panels: (title, metric name); series are f"{split}/{name}" for split in SPLITS
CURVE_PANELS = (
    ("loss", "loss"),
    ("reconstruction", "recon"),
    ("KL", "kl"),
    ("KL weight", "kl_weight"),
)
SPLITS = ("train", "val")


# --- drawing ------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_layout() -> Iterator[None]:
    """Around a savefig: a figure too small for its decorations (8x8 images, many panels) is drawn
    without the constrained layout, as matplotlib does anyway, but without its warning on the
    console in the middle of a sweep's progress."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="constrained_layout not applied", category=UserWarning)
        yield


def new_figure(width: float, height: float) -> Figure:
    """A figure of width x height inches on its own Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # binds itself as fig.canvas
    return fig


def learning_curves(history: Sequence[dict[str, float]]) -> Figure:
    """One panel per CURVE_PANELS entry that has data in `history` (a dict per epoch, e.g.
    {"train/loss": ..., "val/loss": ...}), train and val as two lines over the epochs. Epochs
    are `d["epoch"]` when given, else 1, 2, ...; a key missing in some epochs leaves a gap."""
    epochs = [d.get("epoch", i + 1) for i, d in enumerate(history)]
    panels = curve_panels(history)
    fig = new_figure(3.2 * max(1, len(panels)), 2.8)
    if not panels:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no learning curves recorded", ha="center", va="center")
        ax.set_axis_off()
        return fig
    from matplotlib.ticker import MaxNLocator

    for ax, (title, series) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for split, values in series.items():
            # markers: a one-epoch run still shows its single point
            ax.plot(epochs, values, marker="o", markersize=3, label=split)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("learning curves")
    return fig


def curve_panels(history: Sequence[dict[str, float]]) -> list[tuple[str, dict[str, list[float]]]]:
    """[(panel title, {split: values per epoch})] for the CURVE_PANELS with at least one finite value."""
    panels = []
    for title, name in CURVE_PANELS:
        series = {split: [_number(d.get(f"{split}/{name}")) for d in history] for split in SPLITS}
        series = {k: v for k, v in series.items() if any(math.isfinite(x) for x in v)}
        if series:
            panels.append((title, series))
    return panels


def image_grid(images: Tensor, nrow: int, title: str) -> Figure:
    """images (N, C, H, W) in [0, 1], C in {1, 3}, tiled `nrow` per row (torchvision's make_grid
    convention) into one picture."""
    tiles = tile_images(images, nrow)
    fig = new_figure(*_size_for(tiles, max_width=8.0))
    ax = fig.add_subplot()
    _show(ax, tiles)
    ax.set_title(title)
    return fig


def reconstructions(x: Tensor, x_rec: Tensor, n: int = N_RECONSTRUCTIONS) -> Figure:
    """The first n originals (B, C, H, W) in one row over their reconstructions in another."""
    n = min(n, len(x), len(x_rec))
    rows = [("original", tile_images(x[:n], n)), ("reconstruction", tile_images(x_rec[:n], n))]
    width, height = _size_for(rows[0][1], max_width=8.0)
    fig = new_figure(width + 1.0, 2 * height + 0.4)
    for ax, (label, tiles) in zip(fig.subplots(2, 1), rows):
        _show(ax, tiles)
        ax.set_axis_on()  # keep the frame for the row label, without ticks
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label)
    fig.suptitle("reconstructions (posterior mean)")
    return fig


def latent_scatter(z: np.ndarray, y: np.ndarray, seed: int = 0, projection: str = "pca") -> Figure:
    """Latent codes z (N, K) coloured by label y (N,). K = 2 is drawn directly, K > 2 projected on
    its first two principal components (exact SVD: fast and deterministic) or, with
    projection="tsne", embedded by scikit-learn's t-SNE (on a seeded subsample of TSNE_POINTS, seeded
    too), K = 1 against a small seeded jitter. The title says which. Points are drawn in a seeded
    random order so no class is painted over all the others."""
    if projection not in PROJECTIONS:
        raise ValueError(f"unknown latent projection {projection!r}; allowed: {', '.join(PROJECTIONS)}")
    z = np.asarray(z, dtype=np.float64).reshape(len(z), -1)
    y = np.asarray(y).ravel()
    n, k = z.shape
    rng = np.random.default_rng(seed)
    if k == 2:
        xy, labels, title = z, ("z1", "z2"), "latent space (2 dims)"
    elif k == 1:
        xy = np.column_stack([z[:, 0], rng.uniform(-0.5, 0.5, n)])
        labels, title = ("z1", "jitter"), "latent space (1 dim, jittered)"
    elif projection == "tsne":
        if n > TSNE_POINTS:  # t-SNE is quadratic in the points: a fixed seeded subsample
            keep = np.sort(rng.choice(n, TSNE_POINTS, replace=False))
            z, y, n = z[keep], y[keep], TSNE_POINTS
        xy = tsne(z, seed)
        labels = ("t-SNE 1", "t-SNE 2")
        title = f"latent space (t-SNE of {k} dims, {n} points)"
    else:
        from sklearn.decomposition import PCA

        finite = np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)  # PCA refuses non-finite codes
        title = f"latent space (PCA of {k} dims)"
        if n < 2 or not np.ptp(finite, axis=0).any():  # one code for every image (a collapsed posterior)
            xy, labels = np.zeros((n, 2)), ("PC1", "PC2")
            title += ": every code the same"
        else:
            pca = PCA(n_components=2, svd_solver="full").fit(finite)
            xy = pca.transform(finite)
            labels = tuple(f"PC{i + 1} ({r:.0%} of variance)" for i, r in enumerate(pca.explained_variance_ratio_))

    order = rng.permutation(n)
    classes = np.unique(y)
    fig = new_figure(6.0, 5.0)
    ax = fig.add_subplot()
    marker_size = 6 if n > 1000 else 12
    if len(classes) <= 20:  # categorical colours with a legend
        import matplotlib

        cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
        colour_index = np.searchsorted(classes, y)  # (N,) position of each label in `classes`
        ax.scatter(xy[order, 0], xy[order, 1], c=cmap(colour_index[order]), s=marker_size,
                   alpha=0.8, linewidths=0)
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], marker="o", linestyle="", color=cmap(i), label=str(c))
                   for i, c in enumerate(classes)]
        ax.legend(handles=handles, title="label", fontsize="small",
                  loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    else:  # many classes: a continuous colour scale
        points = ax.scatter(xy[order, 0], xy[order, 1], c=y[order], cmap="viridis", s=marker_size,
                            alpha=0.8, linewidths=0)
        fig.colorbar(points, ax=ax, label="label")
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


def tsne(z: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N, 2) t-SNE embedding of z (N, K) (van der Maaten & Hinton 2008, scikit-learn), seeded and
    PCA-initialised: the same codes give the same picture."""
    from sklearn.manifold import TSNE

    n = len(z)
    if n < 3:
        return np.zeros((n, 2))
    finite = np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
    perplexity = min(TSNE_PERPLEXITY, (n - 1) / 3)  # scikit-learn needs perplexity < n
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(finite)


def grid_latents(n: int, span: float = GRID_SPAN, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """(n*n, 2) latents on a regular grid over [-span, span]^2, row-major as latent_traversal_grid
    draws them: z1 grows left to right, z2 grows bottom to top (as in the scatter plot)."""
    values = torch.linspace(-span, span, n, device=device, dtype=dtype)  # (n,)
    z2, z1 = torch.meshgrid(values.flip(0), values, indexing="ij")  # (n, n) each; row 0 is z2 = +span
    return torch.stack([z1.reshape(-1), z2.reshape(-1)], dim=1)


def latent_traversal_grid(images: Tensor, n: int, span: float = GRID_SPAN) -> Figure:
    """images (n*n, C, H, W) decoded from `grid_latents(n, span)`, drawn with z1/z2 axes."""
    tiles = tile_images(images, n, pad=0)
    fig = new_figure(6.0, 6.0)
    ax = fig.add_subplot()
    half = span / max(n - 1, 1)  # half a cell: each tile is centred on its latent value
    _show(ax, tiles, extent=(-span - half, span + half, -span - half, span + half))
    ax.set_axis_on()
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_title(f"decoded latent grid over [-{span:g}, {span:g}]²")
    return fig


def interpolation_strip(images: Tensor, title: str = "latent interpolation") -> Figure:
    """images (S, C, H, W), the decoded steps of an interpolation, in one row."""
    tiles = tile_images(images, len(images))
    fig = new_figure(*_size_for(tiles, max_width=10.0))
    ax = fig.add_subplot()
    _show(ax, tiles)
    ax.set_title(title)
    return fig


def interpolation_gif(images: Tensor, path: str | Path) -> None:
    """Write images (S, C, H, W) in [0, 1] as an animated GIF that plays forward and back, each frame
    upscaled (nearest neighbour) to at least GIF_MIN_SIZE px high so that 28x28 digits are visible.
    PIL merges identical consecutive frames (their durations add up)."""
    from PIL import Image

    frames = _to_uint8(images)  # (S, H, W) or (S, H, W, 3)
    scale = max(1, math.ceil(GIF_MIN_SIZE / frames.shape[1]))
    pictures = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST)
                for f in frames]
    loop = pictures + pictures[-2:0:-1]  # forward then back: a seamless loop
    loop[0].save(path, save_all=True, append_images=loop[1:], duration=GIF_FRAME_MS, loop=0)


# --- one run ------------------------------------------------------------------------------------


@torch.inference_mode()
def draw_run_figures(
    model: AutoEncoder,
    split: DeviceSplit,
    history: Sequence[dict[str, float]] | None,
    out_dir: str | Path,
    *,
    likelihood: str = "bernoulli",
    seed: int = 0,
    max_points: int = 2000,
    projection: str = "pca",
) -> list[Path]:
    """Draw the FIGURES of a trained `model` on `split` (the test split) into `out_dir` and return
    the paths written, in FIGURES order. Skipped: learning_curves.png without any recorded curve,
    samples.png for families without a prior to sample, latent_grid.png unless latent_dim == 2.
    `projection` (pca | tsne) draws the latent scatter of more than 2 dims.

    The model is put in eval mode (and given back in the mode it came in). Random draws (prior
    samples, the scatter subsample, dynamic binarization of the split) are seeded with `seed` under
    a forked RNG, so the figures are reproducible and the caller's random stream is untouched."""
    if likelihood not in LIKELIHOOD_MEANS:
        raise ValueError(f"unknown likelihood {likelihood!r}; allowed: {', '.join(LIKELIHOOD_MEANS)}")
    mean_of = LIKELIHOOD_MEANS[likelihood]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    history = history or []
    device = split.x.device  # indices into the split live there (the model's device, in this package)
    param = next(model.parameters())  # latents are made on the model's device and dtype
    was_training = model.training
    model.eval()
    written: dict[str, Path] = {}

    def save(name: str, fig: Figure) -> None:
        with quiet_layout():
            fig.savefig(out / name, dpi=DPI)
        fig.clear()  # no pyplot registry to close from; drop the artists now
        written[name] = out / name

    def decode(z: Tensor) -> Tensor:  # (B, K) -> (B, C, H, W) images in [0, 1]
        return mean_of(model.decode(z)).float()

    try:
        with _seeded(device, seed):
            if curve_panels(history):
                save("learning_curves.png", learning_curves(history))

            n = len(split)
            x = split.batch(torch.arange(min(N_RECONSTRUCTIONS, n), device=device))  # (8, C, H, W)
            save("reconstructions.png", reconstructions(x, decode(model.encode(x).mean)))

            if model.generative:
                images = decode(model.sample_prior(N_SAMPLES))
                save("samples.png", image_grid(images, 8, f"samples from the prior ({N_SAMPLES})"))

            index = torch.arange(n, device=device)
            if n > max_points:  # a seeded subset, sorted so it does not depend on batch order
                index = torch.randperm(n, device="cpu")[:max_points].sort().values.to(device)
            z = torch.cat([model.encode(split.batch(i)).mean.float().cpu()
                           for i in index.split(ENCODE_BATCH)])  # (P, K)
            save("latent_scatter.png", latent_scatter(z.numpy(), split.y[index].cpu().numpy(), seed, projection))

            if model.latent_dim == 2:
                grid = grid_latents(GRID_SIZE, GRID_SPAN, device=param.device, dtype=param.dtype)
                images = torch.cat([decode(g) for g in grid.split(ENCODE_BATCH)])
                save("latent_grid.png", latent_traversal_grid(images, GRID_SIZE, GRID_SPAN))

            a, b = interpolation_ends(split.y)
            ends = split.batch(torch.tensor([a, b], device=device))  # (2, C, H, W)
            za, zb = model.encode(ends).mean  # (K,) each
            t = torch.linspace(0.0, 1.0, INTERPOLATION_STEPS, device=za.device, dtype=za.dtype)[:, None]
            images = decode((1 - t) * za + t * zb)  # (S, C, H, W), linear in the posterior mean
            ya, yb = int(split.y[a]), int(split.y[b])
            save("interpolation.png", interpolation_strip(
                images, f"latent interpolation: test image {a} (label {ya}) → {b} (label {yb})"))
            interpolation_gif(images, out / "interpolation.gif")
            written["interpolation.gif"] = out / "interpolation.gif"
    finally:
        model.train(was_training)
    return [written[name] for name in FIGURES if name in written]


def interpolation_ends(y: Tensor) -> tuple[int, int]:
    """Indices of two test images to interpolate between: the first one and the first one after it
    with a different label (the next image when all labels are equal, itself when it is alone)."""
    y = y.reshape(-1)
    if len(y) == 0:
        raise ValueError("cannot interpolate on an empty split")
    other = (y != y[0]).nonzero().flatten()
    return 0, int(other[0]) if len(other) else min(1, len(y) - 1)


# --- helpers ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Run the block with torch's RNG seeded, restoring the CPU RNG and `device`'s RNG after (the
    RNGs of other accelerators in the process, if any, are reseeded and not restored)."""
    if device.type == "cpu":
        forked = torch.random.fork_rng(devices=[])  # [] = the CPU RNG only
    else:
        index = device.index if device.index is not None else torch.get_device_module(device.type).current_device()
        forked = torch.random.fork_rng(devices=[index], device_type=device.type)
    with forked:
        torch.manual_seed(seed)
        yield


def _number(value: object) -> float:
    """A history value as a float; NaN (a gap in the curve) when absent or not a number."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _to_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1], C in {1, 3} -> uint8 numpy (N, H, W) or (N, H, W, 3)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1|3, H, W), got {tuple(images.shape)}")
    x = images.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).cpu()
    x = x.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    return x[..., 0] if x.shape[-1] == 1 else x


def tile_images(images: Tensor, ncol: int, pad: int = 1) -> np.ndarray:
    """images (N, C, H, W) in [0, 1] -> one float picture (rows*(H+pad)-pad, ncol*(W+pad)-pad[, 3])
    with `ncol` images per row and white `pad`-pixel gaps; unused cells at the end stay white."""
    x = _to_uint8(images).astype(np.float32) / 255.0  # (N, H, W[, 3])
    n, h, w = x.shape[:3]
    ncol = max(1, min(ncol, n))
    nrows = max(1, math.ceil(n / ncol))
    canvas = np.ones((nrows * (h + pad) - pad, ncol * (w + pad) - pad, *x.shape[3:]), dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, ncol)
        canvas[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = x[i]
    return canvas


def _show(ax, tiles: np.ndarray, extent: tuple[float, float, float, float] | None = None) -> None:
    # grey images on a fixed [0, 1] scale (not stretched per figure), crisp pixels
    ax.imshow(tiles, cmap="gray" if tiles.ndim == 2 else None, vmin=0.0, vmax=1.0,
              interpolation="nearest", extent=extent)
    ax.set_axis_off()


def _size_for(tiles: np.ndarray, max_width: float) -> tuple[float, float]:
    """Figure inches for a tiled picture: at most max_width wide, at least 2 px per image pixel at
    DPI where that fits, plus room for a title."""
    h, w = tiles.shape[:2]
    width = min(max_width, max(4.0, 2 * w / DPI))
    return width, width * h / w + 0.5
