"""What the runner adds to a packed epoch: the training loop alone (vaebench.packed.train_packed)
vs the same pack inside `vaebench run` (claims, tracking, checkpoints: vaebench.units), with the
epochs' metrics sent to MLflow after every epoch (`units.METRICS_EVERY_S = 0`, as before) and
several epochs in one write (the default). Each variant in a fresh store, alternating, repeated.

    python benchmarks/bench_overhead.py                       # CPU: 8 members, MLP [4] on mnist5k
    python benchmarks/bench_overhead.py --device cuda --dataset mnist --hidden 400 400   # the GPU study's MLP pack

A step that leaves the host no slack (a tiny model on the CPU; a packed, captured MLP on a GPU)
shows what the trainer's process spends besides its step: a write to MLflow holds the interpreter
lock for milliseconds, and the trainer's loop needs it for every kernel it launches. Reported per
variant: an epoch in the training loop (`train/epoch_seconds`, median over the epochs after the
first) and by the clock (median gap between a member's epoch ends, the runner's callbacks and
checkpoints included), and their ratio to the loop alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import device_and_data

YAML = """
name: bench-overhead
data_dir: {data_dir}
defaults: {{dataset: {dataset}, arch: mlp, arch_options: {{mlp: {{hidden: {hidden}}}}}, latent_dim: 16,
           batch_size: {batch}, epochs: {epochs}, device: {device}, max_train_samples: {max_train}}}
matrix: {{beta: {betas}, reduction: [sum, mean]}}
evaluate: {{iw_samples: 4, clustering: false, figures: false, max_test_samples: 500}}
"""


def members_yaml(args: argparse.Namespace) -> str:
    betas = [0.5 * 2 ** i for i in range((args.members + 1) // 2)]
    return YAML.format(data_dir=args.data_dir, dataset=args.dataset, hidden=list(args.hidden), batch=args.batch_size,
                       epochs=args.epochs, device=args.device, max_train=args.max_train or "null", betas=betas)


def alone(path: Path, members: int) -> tuple[float, float]:
    """(in the loop, by the clock) of the pack trained by train_packed, nothing around it."""
    from vaebench.config import load_experiment
    from vaebench.matrix import expand
    from vaebench.packed import train_packed
    from vaebench.train import dataset_for

    exp = load_experiment(path)
    settings = [spec.settings for spec in expand(exp)][:members]
    data = dataset_for(settings[0], exp.resolved_data_dir(), exp.base_dir)
    ends: list[float] = []
    results = train_packed(settings, data, progress=False,
                           on_epoch_end=lambda i, *_: ends.append(time.perf_counter()) if i == 0 else None)
    return steady(results[0].history), statistics.median(b - a for a, b in zip(ends[1:], ends[2:]))


def in_runner(path: Path, members: int, every_s: float) -> tuple[float, float]:
    """(in the loop, by the clock) of the same pack in `vaebench run`, metrics sent every `every_s`."""
    import mlflow

    from vaebench import units
    from vaebench.config import load_experiment
    from vaebench.runner import run_experiment

    exp = load_experiment(path)
    before, units.METRICS_EVERY_S = units.METRICS_EVERY_S, every_s
    try:
        summary = run_experiment(exp, pack=members, eval_workers="0", progress=False, echo=lambda line: None)
    finally:
        units.METRICS_EVERY_S = before
    assert summary.exit_code == 0, "the study failed"
    client = mlflow.MlflowClient(exp.resolved_tracking_uri())
    run_id = summary.results[0].run_id
    history = [{"train/epoch_seconds": m.value}
               for m in sorted(client.get_metric_history(run_id, "train/epoch_seconds"), key=lambda m: m.step)]
    stamps = sorted(m.timestamp / 1000 for m in client.get_metric_history(run_id, "train/loss"))
    return steady(history), statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:]))


def steady(history: list[dict[str, float]]) -> float:
    return statistics.median(h["train/epoch_seconds"] for h in history[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--data-dir", default=os.environ.get("VAEBENCH_DATA_DIR", "./data"))
    p.add_argument("--members", type=int, default=8, help="cells in the pack (an even number: sum and mean)")
    p.add_argument("--hidden", type=int, nargs="+", default=[4], help="the MLP's hidden layers")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--max-train", type=int, default=0, help="training images (0: all)")
    p.add_argument("--repeat", type=int, default=3, help="rounds of the three variants, alternating")
    args = p.parse_args()
    if args.epochs < 3 or args.members < 2 or args.members % 2:
        p.error("--epochs at least 3 (the first is left out); --members an even number of at least 2")
    device, _ = device_and_data(p, args)
    args.device = str(device)

    variants = {"alone": None, "runner, metrics every epoch": 0.0, "runner, metrics batched": None}
    seen: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):
            for v, name in enumerate(variants):
                folder = Path(tmp) / f"round{r}-variant{v}"
                folder.mkdir()
                path = folder / "study.yaml"
                path.write_text(members_yaml(args))
                if name == "alone":
                    seen[name].append(alone(path, args.members))
                else:
                    from vaebench import units

                    every = variants[name] if variants[name] is not None else units.METRICS_EVERY_S
                    seen[name].append(in_runner(path, args.members, every))
    loop0 = statistics.median(x[0] for x in seen["alone"])
    clock0 = statistics.median(x[1] for x in seen["alone"])
    print(f"{args.members} members, MLP {args.hidden}, batch {args.batch_size}, {args.dataset} on {args.device}, "
          f"{args.epochs} epochs; medians of {args.repeat} rounds")
    for name, xs in seen.items():
        loop, clock = statistics.median(x[0] for x in xs), statistics.median(x[1] for x in xs)
        print(f"  {name:28s} an epoch: {loop:.3f} s in the loop (x{loop / loop0:.2f}), "
              f"{clock:.3f} s by the clock (x{clock / clock0:.2f})")


if __name__ == "__main__":
    main()
