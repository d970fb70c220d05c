"""Figures of one run: the right files for each family / latent size / channel count, all readable."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaebench.batches import DeviceSplit, to_device
from vaebench.data import Split
from vaebench.figures import (
    FIGURES,
    draw_run_figures,
    grid_latents,
    image_grid,
    interpolation_ends,
    interpolation_gif,
    latent_scatter,
    learning_curves,
    tile_images,
    tsne,
)
from vaebench.models import build_model

HISTORY = [
    {"epoch": e, "train/loss": 100.0 / e, "val/loss": 110.0 / e, "train/recon": 90.0 / e,
     "val/recon": 95.0 / e, "train/kl": 5.0 + e, "val/kl": 5.5 + e, "train/kl_weight": min(1.0, e / 2)}
    for e in range(1, 4)
]


def random_split(shape: tuple[int, int, int], n: int = 40, seed: int = 0) -> DeviceSplit:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    y = torch.arange(n, dtype=torch.int64) % 4
    return to_device(Split(x, y), torch.device("cpu"), image_size=None, binarization="none")


def expected(*skip: str) -> list[str]:
    return [f for f in FIGURES if f not in skip]


@pytest.mark.parametrize(
    "family, shape, latent_dim, files",
    [
        ("vae", (1, 8, 8), 2, expected()),
        ("vae", (1, 8, 8), 5, expected("latent_grid.png")),
        ("ae", (1, 8, 8), 2, expected("samples.png")),
        ("ae", (3, 32, 32), 5, expected("samples.png", "latent_grid.png")),
        ("vae", (3, 32, 32), 2, expected()),
        ("wae_mmd", (1, 8, 8), 4, expected("latent_grid.png")),  # deterministic, yet it has a prior to sample
        ("vq_vae", (1, 8, 8), 4, expected("samples.png", "latent_grid.png")),  # no learned prior over its codes
    ],
)
def test_draw_run_figures_writes_the_expected_files(
    tmp_path: Path, family: str, shape: tuple[int, int, int], latent_dim: int, files: list[str]
) -> None:
    torch.manual_seed(0)
    model = build_model(family, "mlp", in_shape=shape, latent_dim=latent_dim)
    if family == "vq_vae":  # its initial entries are within 1/512 of 0: every picture would be the same
        torch.nn.init.normal_(model.codebook)
    model.train()
    rng_before = torch.get_rng_state()
    paths = draw_run_figures(model, random_split(shape), HISTORY, tmp_path / "figs", seed=1, max_points=25)

    assert [p.name for p in paths] == files
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(files)  # nothing else written
    assert model.training  # given back in the mode it came in
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's random stream is untouched
    for p in paths:
        with Image.open(p) as im:
            im.load()  # decodes the whole file
            assert 150 <= im.width <= 2000 and 80 <= im.height <= 2000, (p.name, im.size)
        assert p.stat().st_size < 1_000_000
    with Image.open(tmp_path / "figs" / "interpolation.gif") as gif:
        assert gif.n_frames > 1 and gif.is_animated
        assert gif.height >= 150  # upscaled from 8 or 32 px


def test_draw_run_figures_is_reproducible_and_skips_missing_history(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("vae", "mlp", in_shape=(1, 8, 8), latent_dim=3)
    split = random_split((1, 8, 8))
    a = draw_run_figures(model, split, [], tmp_path / "a", seed=3)
    b = draw_run_figures(model, split, None, tmp_path / "b", seed=3)
    assert "learning_curves.png" not in {p.name for p in a}
    for pa, pb in zip(a, b):  # same seed, same pixels
        with Image.open(pa) as ia, Image.open(pb) as ib:
            assert np.array_equal(np.asarray(ia.convert("RGB")), np.asarray(ib.convert("RGB"))), pa.name


def test_draw_run_figures_rejects_unknown_likelihood(tmp_path: Path) -> None:
    model = build_model("ae", "mlp", in_shape=(1, 8, 8), latent_dim=2)
    with pytest.raises(ValueError, match="likelihood"):
        draw_run_figures(model, random_split((1, 8, 8)), HISTORY, tmp_path, likelihood="poisson")


def test_learning_curves_skips_absent_panels() -> None:
    fig = learning_curves(HISTORY)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "reconstruction", "KL", "KL weight"]
    ae_history = [{"train/loss": 3.0, "val/loss": 2.5}, {"train/loss": 2.0}]  # val missing in epoch 2
    fig = learning_curves(ae_history)
    assert [ax.get_title() for ax in fig.axes] == ["loss"]
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["train", "val"]
    assert len(learning_curves([]).axes) == 1  # a placeholder, not an error


def test_latent_scatter_title_names_the_projection() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 300)
    assert latent_scatter(rng.normal(size=(300, 16)), y).axes[0].get_title() == "latent space (PCA of 16 dims)"
    assert "2 dims" in latent_scatter(rng.normal(size=(300, 2)), y).axes[0].get_title()
    assert "1 dim" in latent_scatter(rng.normal(size=(300, 1)), y).axes[0].get_title()
    legend = latent_scatter(rng.normal(size=(300, 3)), y).axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [str(i) for i in range(10)]
    many = latent_scatter(rng.normal(size=(300, 3)), np.arange(300) % 50)  # too many for a legend
    assert len(many.axes) == 2  # the plot and its colorbar


def test_latent_scatter_of_identical_codes_says_so_without_a_warning() -> None:
    """A collapsed posterior gives every image the same mean: there is no variance to explain."""
    import warnings

    z = np.tile(np.array([[0.3, -1.0, 2.0, 0.0]]), (200, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scikit-learn's 0/0 in explained_variance_ratio_ would raise
        fig = latent_scatter(z, np.arange(200) % 10)
    ax = fig.axes[0]
    assert ax.get_title() == "latent space (PCA of 4 dims): every code the same"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("PC1", "PC2")
    assert np.array_equal(ax.collections[0].get_offsets(), np.zeros((200, 2)))


def test_latent_scatter_by_tsne_on_a_fixed_subsample() -> None:
    rng = np.random.default_rng(0)
    y = np.arange(1200) % 4
    z = rng.normal(size=(1200, 6)) + 4.0 * np.eye(6)[y]  # four separated clusters
    fig = latent_scatter(z, y, seed=3, projection="tsne")
    assert fig.axes[0].get_title() == "latent space (t-SNE of 6 dims, 1000 points)"
    assert len(fig.axes[0].collections[0].get_offsets()) == 1000
    assert np.array_equal(tsne(z[:60], seed=3), tsne(z[:60], seed=3))  # seeded: the same picture twice
    assert latent_scatter(z[:, :2], y, projection="tsne").axes[0].get_title() == "latent space (2 dims)"
    with pytest.raises(ValueError, match="allowed: pca, tsne"):
        latent_scatter(z, y, projection="umap")


def test_grid_latents_is_row_major_with_z2_up() -> None:
    z = grid_latents(3, span=3.0)
    assert z.shape == (9, 2)
    assert z[0].tolist() == [-3.0, 3.0]  # top left
    assert z[2].tolist() == [3.0, 3.0]  # top right
    assert z[8].tolist() == [3.0, -3.0]  # bottom right


def test_tile_images_layout_and_channels() -> None:
    grey, rgb = torch.rand(5, 1, 4, 6), torch.rand(5, 3, 4, 6)
    assert tile_images(grey, 3).shape == (2 * 5 - 1, 3 * 7 - 1)
    assert tile_images(rgb, 3).shape == (2 * 5 - 1, 3 * 7 - 1, 3)
    with pytest.raises(ValueError):
        tile_images(torch.rand(2, 2, 4, 4), 2)
    assert image_grid(rgb, 5, "x").axes[0].get_title() == "x"


def test_interpolation_gif_has_frames(tmp_path: Path) -> None:
    steps = torch.linspace(0, 1, 6)[:, None, None, None].expand(6, 3, 10, 10)  # distinct frames
    interpolation_gif(steps, tmp_path / "a.gif")
    with Image.open(tmp_path / "a.gif") as gif:
        assert gif.n_frames == 2 * 6 - 2  # forward and back
        assert gif.size == (160, 160)


def test_interpolation_ends_pick_different_labels() -> None:
    assert interpolation_ends(torch.tensor([3, 3, 5, 1])) == (0, 2)
    assert interpolation_ends(torch.tensor([2, 2])) == (0, 1)
    assert interpolation_ends(torch.tensor([7])) == (0, 0)


def test_a_figure_too_small_for_its_layout_is_saved_without_a_console_warning(tmp_path) -> None:
    import warnings

    from vaebench.figures import new_figure, quiet_layout

    def crowded():
        fig = new_figure(0.3, 0.3)
        for ax in fig.subplots(4, 4).flat:
            ax.set_title("a title far too long for the panel")
        return fig

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="constrained_layout not applied"):
            crowded().savefig(tmp_path / "loud.png")  # what a sweep printed in the middle of its progress
        with quiet_layout():
            crowded().savefig(tmp_path / "quiet.png")
    assert (tmp_path / "quiet.png").stat().st_size > 0
