"""Shared fixtures: isolated environment and small experiments files written per test."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Callable

import pytest

TINY = """
name: tiny
seeds: [0]
defaults:
  dataset: digits
  epochs: 2
  batch_size: 64
  max_train_samples: 256
  arch_options:
    mlp: {hidden: [32]}
evaluate: {iw_samples: 8, clustering: false, figures: false}
matrix:
  model: [ae, vae]
  latent_dim: [2]
"""


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests never pick up a developer's tracking server or data dir.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("VAEBENCH_DATA_DIR", raising=False)


@pytest.fixture
def write_yaml(tmp_path: Path) -> Callable[[str, str], Path]:
    def write(text: str, name: str = "experiments.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip())
        return path

    return write


@pytest.fixture
def tiny_file(write_yaml) -> Path:
    return write_yaml(TINY)
