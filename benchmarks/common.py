"""What the benchmark scripts share: reading --device and --dataset the same way.

The scripts run as `python benchmarks/NAME.py`, which puts this folder on sys.path: `from common import ...`.
"""

from __future__ import annotations

import argparse


def device_of(p: argparse.ArgumentParser, args: argparse.Namespace):
    """The device `--device` names; without CUDA, `--device cuda` is one argparse error (exit 2)."""
    from vaebench.train import resolve_device

    try:
        return resolve_device(args.device)
    except RuntimeError as e:
        p.error(str(e))


def device_and_data(p: argparse.ArgumentParser, args: argparse.Namespace, *, download: bool = False):
    """The device `--device` names, then the dataset `--dataset` names under `--data-dir`. The flag
    is checked first (`device_of`), before any file is looked for; missing dataset files are one
    line too."""
    from vaebench.data import DatasetUnavailable, load_dataset

    device = device_of(p, args)
    try:
        data = load_dataset(args.dataset, args.data_dir, download=download)
    except DatasetUnavailable as e:
        raise SystemExit(f"{e}\n(or run with --dataset mnist5k)")
    return device, data
