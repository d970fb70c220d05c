"""Matrix expansion at scale: seconds and peak memory to load, expand and list (`vaebench ls`) a
matrix of 10^3 .. 10^5 cells (five axes of ten values, one exclude rule, one include entry).

    python benchmarks/bench_matrix.py [--cells 1000 10000 100000]

Each size runs in a fresh process, so the peak RSS is that size's own.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Ten values per axis; the first k axes make a 10^k-cell matrix.
AXES = {
    "latent_dim": list(range(1, 11)),
    "beta": [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0],
    "lr": [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2, 5e-2],
    "weight_decay": [0.0, 1e-6, 1e-5, 1e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2],
    "epochs": list(range(1, 11)),
}


def experiments_file(cells: int, folder: Path) -> Path:
    n_axes = len(str(cells)) - 1
    if 10 ** n_axes != cells or not 1 <= n_axes <= len(AXES):
        raise SystemExit(f"--cells takes powers of ten from 10 to 10^{len(AXES)}, not {cells}")
    matrix = dict(list(AXES.items())[:n_axes])
    doc = {"name": f"bench-{cells}", "defaults": {"dataset": "digits"}, "matrix": matrix,
           "exclude": [{"latent_dim": 1, "beta": 0.0}] if n_axes >= 2 else [],
           "include": [{"model": "dae", "noise": 0.5}] if n_axes < len(AXES) else []}
    path = folder / f"bench-{cells}.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def measure(cells: int) -> dict:
    from vaebench.cli import main as cli_main
    from vaebench.config import load_experiment
    from vaebench.matrix import expand

    with tempfile.TemporaryDirectory() as tmp:
        path = experiments_file(cells, Path(tmp))
        t0 = time.perf_counter()
        exp = load_experiment(path)
        t1 = time.perf_counter()
        specs = expand(exp)
        t2 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = cli_main(["ls", str(path)])
        t3 = time.perf_counter()
    assert code == 0, out.getvalue()[-500:]
    return {"cells": len(specs), "load": t1 - t0, "expand": t2 - t1, "ls": t3 - t2,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, nargs="+", default=[1000, 10_000, 100_000])
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size, print JSON
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    print(f"{'cells':>8}  {'load_experiment':>15}  {'expand':>8}  {'vaebench ls':>11}  {'peak RSS':>9}")
    for n in args.cells:
        done = subprocess.run([sys.executable, __file__, "--one", str(n)], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{n:>8}  failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{r['cells']:>8}  {r['load']:>14.2f}s  {r['expand']:>7.2f}s  {r['ls']:>10.2f}s  "
              f"{r['peak_rss_mb']:>6.0f} MB")


if __name__ == "__main__":
    main()
