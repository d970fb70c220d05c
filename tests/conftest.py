"""Shared fixtures: isolated environment and small experiments files written per test."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Callable, Iterator

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


ISOLATED_ENV = ("MLFLOW_TRACKING_URI", "VAEBENCH_DATA_DIR")


def _clear_env() -> dict[str, str]:
    return {name: os.environ.pop(name) for name in ISOLATED_ENV if name in os.environ}


@pytest.fixture(scope="session", autouse=True)
def _clean_session_env() -> Iterator[None]:
    # Tests never pick up a developer's tracking server or data dir (module-scoped fixtures,
    # which are set up before the function-scoped ones below, included).
    saved = _clear_env()
    yield
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _isolated_env() -> Iterator[None]:
    # Undo what a test leaves behind too: `mlflow.set_tracking_uri` writes MLFLOW_TRACKING_URI
    # into os.environ, which monkeypatch.delenv would not restore for a variable that was unset.
    yield
    _clear_env()


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
