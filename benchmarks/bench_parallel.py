"""Sweep wall time: cells one after another in one process (the baseline) vs `--jobs N` worker
processes, on the same slice of the demo matrix, measured in the same run.

    python benchmarks/bench_parallel.py [--jobs 2] [--only dataset=digits]

Each measurement uses a fresh temporary MLflow store, so nothing is skipped.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from vaebench.config import load_experiment
from vaebench.runner import parse_only, run_experiment

ROOT = Path(__file__).resolve().parents[1]


def sweep(jobs: int, only: dict) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlruns.db"
        exp = load_experiment(ROOT / "experiments.yaml")
        t0 = time.perf_counter()
        summary = run_experiment(exp, only=only, jobs=jobs, progress=False, echo=lambda s: None)
        return time.perf_counter() - t0, len(summary.of("trained"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    p.add_argument("--only", action="append", default=None, help="SETTING=VALUE (default dataset=digits)")
    args = p.parse_args()
    only = parse_only(args.only or ["dataset=digits"])
    serial, n = sweep(1, only)
    parallel, _ = sweep(args.jobs, only)
    print(f"{n} cells of experiments.yaml ({only}): 1 process {serial:.1f} s, {args.jobs} processes "
          f"{parallel:.1f} s -> speed-up x{serial / parallel:.2f}")


if __name__ == "__main__":
    main()
