"""What reliability costs: the claim of a cell (vaebench.claims: claim + release) and a checkpoint
written whole with its sha256 (tracking.log_torch: serialise, hash, digest tag, temporary file,
fsync, rename) against MLflow's plain `log_artifact` of the same file, and verifying it on load.
On a local SQLite store in a temporary folder.

    python benchmarks/bench_reliability.py [--claims 50] [--sizes 0.1 10 100]

Sizes are checkpoint sizes in MB (a small MLP is ~0.1 MB; deep_conv on CIFAR-10 ~100 MB).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claims", type=int, default=50, help="cells claimed and released, one after another")
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.1, 10.0, 100.0], help="checkpoint sizes, MB")
    args = parser.parse_args()

    import torch

    from vaebench import claims, tracking

    with tempfile.TemporaryDirectory() as tmp:
        tracker = tracking.connect(f"sqlite:///{Path(tmp) / 'mlruns.db'}", "bench")
        run_id = tracking.start_run(tracker, "bench", {tracking.TAG_KIND: "cell"})
        claimer = claims.Claimer(tracker)
        cycle = iter(range(10 ** 6))

        def claim_release() -> None:
            key = f"cell{next(cycle)}"
            assert claimer.claim(key, key) is None
            claimer.release(key)

        claim_release()  # warm-up
        per_claim = median_ms(claim_release, args.claims)
        print(f"claim + release of a cell: {per_claim:.1f} ms (median of {args.claims}; SQLite, this machine)")
        claimer.close()

        for mb in args.sizes:
            obj = {"model": {"w": torch.randn(int(mb * 2 ** 20 / 4))}, "epoch": 0}
            plain_path = Path(tmp) / "plain" / "last.pt"
            plain_path.parent.mkdir(exist_ok=True)

            def plain() -> None:
                torch.save(obj, plain_path)
                tracker.client.log_artifact(run_id, str(plain_path), "plain")

            repeat = 5 if mb >= 50 else 15
            base = median_ms(plain, repeat)
            whole = median_ms(lambda: tracking.log_torch(tracker, run_id, tracking.CHECKPOINT_PATH, obj), repeat)
            fresh = tracking.connect(tracker.uri, "bench")  # no cached digest: reads the tag, as on resume
            load = median_ms(lambda: tracking.load_torch(fresh, run_id, tracking.CHECKPOINT_PATH), repeat)
            plain_load = median_ms(lambda: torch.load(plain_path, weights_only=True), repeat)
            print(f"{mb:g} MB checkpoint: written whole with its sha256 {whole:.1f} ms vs torch.save + "
                  f"log_artifact {base:.1f} ms (x{whole / base:.2f}); verified load {load:.1f} ms vs "
                  f"torch.load {plain_load:.1f} ms (x{load / plain_load:.2f})")
            os.sync()


if __name__ == "__main__":
    main()
