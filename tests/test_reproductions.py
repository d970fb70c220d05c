"""The reproduction configs (benchmarks/recipes/*.yaml: reference recipes; benchmarks/papers/*.yaml:
published settings with their numbers): each says in a comment what it reproduces and validates;
a shortened version of each (one epoch on a few images, the torchvision datasets written here in
their own layout, since CI has none) trains, evaluates and reports end to end. The real runs are
for a GPU machine."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

from vaebench.config import load_experiment
from vaebench.matrix import expand, matches
from vaebench.report import build_report
from vaebench.runner import run_experiment

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RECIPES = sorted((BENCHMARKS / "recipes").glob("*.yaml"))
PAPERS = sorted((BENCHMARKS / "papers").glob("*.yaml"))
CONFIGS = RECIPES + PAPERS
TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}
N_TRAIN, N_TEST = 60, 20


def config_id(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


def test_the_reference_recipes_and_papers_are_there() -> None:
    assert len(RECIPES) >= 5 and len(PAPERS) >= 2
    assert {p.stem for p in PAPERS} >= {"burda2015_mnist", "burda2015_mnist_short"}


@pytest.mark.parametrize("path", CONFIGS, ids=config_id)
def test_each_config_says_what_it_reproduces_and_validates(path: Path) -> None:
    comment = path.read_text().split("\nname:")[0]
    assert comment.startswith("#") and ("Reproduces" in comment or "variant of" in comment), path.name
    assert f"vaebench run benchmarks/{config_id(path)}.yaml" in comment  # how to run it
    exp = load_experiment(path)
    specs = expand(exp)
    assert specs and exp.name.startswith("recipe-" if path in RECIPES else "paper-")
    for ref in exp.reference:  # every published number selects the cells it is about
        assert ref.source and any(matches(s, ref.where) for s in specs)


def test_the_burda_configs_are_the_papers_setting() -> None:
    full, short = (expand(load_experiment(BENCHMARKS / "papers" / f"{n}.yaml"))
                   for n in ("burda2015_mnist", "burda2015_mnist_short"))
    s = full[0].settings
    assert (s.dataset, s.binarization, s.latent_dim, s.batch_size, s.epochs) == ("mnist", "dynamic", 50, 20, 3280)
    assert s.arch_config == {"hidden": [200, 200], "activation": "tanh"}
    assert s.lr_schedule.kind == "geometric" and s.lr_schedule.gamma == pytest.approx(10 ** (-1 / 7))
    cells = {(x.settings.model, x.settings.family_config.get("objective"), x.settings.family_config.get("k"))
             for x in full}
    assert cells == {("vae", None, None), ("iwae", "iwae", 1), ("iwae", "iwae", 5), ("iwae", "iwae", 50),
                     ("iwae", "vae", 5), ("iwae", "vae", 50)}
    assert load_experiment(BENCHMARKS / "papers" / "burda2015_mnist.yaml").evaluate.iw_samples == 5000
    # the short variant: the same cells, 121 epochs (stages 0..4 of the schedule), seeds to pack
    assert {x.settings.epochs for x in short} == {121} and len(short) == 3 * len(full)


def write_idx(path: Path, arr: np.ndarray) -> None:
    """An IDX file as torchvision reads it: magic 0x0800 + ndim, the dims, the raw bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(">I", 0x0800 + arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes())


def write_mnist_like(root: Path, folder: str, seed: int = 0) -> None:
    """A tiny MNIST-format dataset (N_TRAIN / N_TEST images, every class) under root/folder/raw."""
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 64, (n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):  # a bright bar per class, so that the codes have something to find
            images[i, 2 + 2 * c: 5 + 2 * c, 4:24] = 255
        write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", labels)


def shortened(path: Path, tmp_path: Path) -> Path:
    """The config with one epoch on a few images, one seed, a tiny evaluation, data in tmp_path."""
    doc = yaml.safe_load(path.read_text())
    data = tmp_path / "data"
    for name, folder in TORCHVISION_FOLDERS.items():
        write_mnist_like(data, folder)
    defaults = doc.setdefault("defaults", {})
    defaults.update(epochs=1, max_train_samples=40, batch_size=min(defaults.get("batch_size", 128), 20))
    doc.update(data_dir=str(data), seeds=[0])
    doc["evaluate"] = {**doc.get("evaluate", {}), "iw_samples": 4, "max_test_samples": 20, "probe_train_samples": 20,
                       "silhouette_samples": 20, "kmeans_restarts": 1}
    out = tmp_path / path.name
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=config_id)
def test_a_shortened_config_runs_end_to_end(path: Path, tmp_path: Path) -> None:
    exp = load_experiment(shortened(path, tmp_path))
    summary = run_experiment(exp, progress=False, echo=lambda _: None)
    assert summary.exit_code == 0, summary.lines()
    assert len(summary.of("trained")) == len(expand(exp))
    html = build_report(exp).read_text(encoding="utf-8")
    assert ("Published numbers" in html) == bool(exp.reference)
