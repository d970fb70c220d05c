"""Training throughput on a GPU, every loop measured side by side in one process, and a 32-cell
study end to end, packed vs one cell at a time.

    python benchmarks/bench_gpu.py                      # both parts (MNIST under VAEBENCH_DATA_DIR or ./data)
    python benchmarks/bench_gpu.py --part loops --device cpu --max-train 5000    # a small dry run

Part `loops` (images per second, full MNIST, batch 128, fp32; MLP VAE 784-400-400-20 and conv VAE
with channels (32, 64), latent 20):
  tutorial     torchvision MNIST + ToTensor + DataLoader(shuffle=True), each batch .to(device)
  plain        vaebench.train.train(): the in-memory uint8 split on the device, eager
  captured     the packed engine with one member, its step captured in a CUDA graph
  packed K=8   8 cells (different betas, seeds) trained as one stacked model, captured; aggregate
  packed K=32  the same with 32 cells
vaebench rows are steady-state epochs (the first epoch, with the capture, is left out) and include
each epoch's validation pass, as a real run does.

Part `matrix`: the 32-cell MNIST study (mlp and conv, z 2 and 16, beta 0.5/1/2/4, sum and mean,
10 epochs, evaluation with k = 1000 and clustering) run through `vaebench run` twice, each into a
fresh MLflow store: `--pack off --eval-workers 0` with `compile: off` (one cell at a time, evaluated
in place: as before packing) and the defaults (`--pack auto`, graphs, evaluation in worker
processes), with each cell's test/elbo and best epoch side by side. The raw-pixel baseline is
computed once before both (it is cached per dataset and never part of a cell's time). The
one-at-a-time side takes about 11 minutes on an H100: `--baseline-from LOG` takes it from an
earlier run's output instead, and `--only arch=mlp` (as `vaebench run --only`) runs part of the
study on both sides, which fits one device call. `--baseline-engine captured` makes the
one-at-a-time side what `--pack off` is on CUDA (the packed engine with one member, its step
captured, evaluated in worker processes): the two sides then differ by the packing alone, so the
test/elbo gaps say what packing itself does (on the CPU a packed MLP member trains bit for bit as
it does alone; tests/test_packed.py).

Two what-ifs, each applied to everything the run measures (both sides of the study alike), to try
a change before making it in vaebench: `--cudnn-benchmark` turns cuDNN's autotuner on
(`torch.backends.cudnn.benchmark`: the conv layers' algorithms are timed at the first call of each
shape, before a step is captured; on an H100 it changed nothing, benchmarks/README.md), and
`--switch-interval S` sets how long a thread may hold the GIL (`sys.setswitchinterval`; Python's
default 0.005 s): the trainer's loop shares its process with the thread that writes to MLflow, and
a packed MLP step leaves the host little slack. The study's timeline prints, per unit, an epoch by
the clock beside the training loop's own `train/epoch_seconds`, to see what that costs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import device_of

from vaebench.plan import parse_pack

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "mlp": {"arch": "mlp", "arch_options": {"mlp": {"hidden": [400, 400]}}},
    "conv": {"arch": "conv", "arch_options": {"conv": {"channels": [32, 64]}}},
}


def settings(arch: str, args: argparse.Namespace, **kw):
    from vaebench.config import RunSettings

    base = dict(dataset="mnist", model="vae", latent_dim=20, batch_size=128, epochs=args.epochs,
                device=args.device, max_train_samples=args.max_train, **MODELS[arch])
    return RunSettings(**{**base, **kw})


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def tutorial_loop(arch: str, args: argparse.Namespace) -> float:
    """The blog-post loop: torchvision dataset + ToTensor + DataLoader, batches copied to the device."""
    import torchvision

    from vaebench.losses import objective
    from vaebench.train import build_for

    s = settings(arch, args)
    ds = torchvision.datasets.MNIST(args.data_dir, train=True, download=False,
                                    transform=torchvision.transforms.ToTensor())
    if args.max_train:
        ds = torch.utils.data.Subset(ds, range(args.max_train))
    loader = torch.utils.data.DataLoader(ds, batch_size=128, shuffle=True)
    torch.manual_seed(0)
    model = build_for(s, (1, 28, 28)).to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    seen, t0 = 0, None
    for i, (x, _) in enumerate(loader):
        if i == 20:  # warm-up batches left out
            sync(args.device)
            t0, seen = time.perf_counter(), 0
        x = x.to(args.device)
        out = model(x)
        loss = objective(out.logits, x, out.posterior.mean, out.posterior.logvar, likelihood="bernoulli",
                         reduction="sum", beta=1.0).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(x)
    sync(args.device)
    return seen / (time.perf_counter() - t0)


def steady(history: list[dict], n_images: int) -> float:
    """Images per second per member over the epochs after the first."""
    seconds = [h["train/epoch_seconds"] for h in history[1:]] or [history[0]["train/epoch_seconds"]]
    return n_images / statistics.median(seconds)


def vaebench_loops(arch: str, data, args: argparse.Namespace) -> dict[str, float]:
    from vaebench.packed import train_packed
    from vaebench.train import train

    n = len(data.train) if not args.max_train else min(args.max_train, len(data.train))
    out = {"plain": steady(train(settings(arch, args, compile="off"), data, progress=False).history, n)}
    (one,) = train_packed([settings(arch, args, compile="graphs")], data, progress=False)
    out["captured"] = steady(one.history, n)
    out["captured.step"] = one.how.get("vaebench.step", "?")
    for k in args.packs:
        members = [settings(arch, args, compile="graphs", beta=0.5 + i % 4, seed=i) for i in range(k)]
        results = train_packed(members, data, progress=False)
        out[f"packed K={k}"] = k * steady(results[0].history, n)
        out[f"packed K={k}.step"] = results[0].how.get("vaebench.step", "?")
    return out


def part_loops(args: argparse.Namespace) -> list[str]:
    from vaebench.data import load_dataset

    data = load_dataset("mnist", args.data_dir)
    rows = {}
    for arch in MODELS:
        rows[arch] = {"tutorial": tutorial_loop(arch, args), **vaebench_loops(arch, data, args)}
        print(arch, rows[arch], flush=True)
    names = ["tutorial", "plain", "captured"] + [f"packed K={k}" for k in args.packs]
    lines = [f"| loop ({args.device}, {args.epochs} epochs) | MLP VAE 784-400-400-20 | conv VAE (32, 64) |",
             "| --- | --- | --- |"]
    for name in names:
        cells = []
        for arch in MODELS:
            v = rows[arch][name]
            how = rows[arch].get(f"{name}.step")
            cells.append(f"{v / 1000:.0f}k img/s" + (f" ({how})" if how and how != "cuda-graph" else ""))
        ratio = rows["mlp"][name] / rows["mlp"]["plain"]
        lines.append(f"| {name} (x{ratio:.1f} vs plain, MLP) | " + " | ".join(cells) + " |")
    return lines


MATRIX = """
name: bench-gpu-matrix
data_dir: {data_dir}
defaults:
  dataset: {dataset}
  max_train_samples: {max_train}
  epochs: {epochs}
  batch_size: 128
  latent_dim: 16
  compile: {compile}
  arch_options:
    mlp: {{hidden: [400, 400]}}
    conv: {{channels: [32, 64]}}
matrix:
  arch: [mlp, conv]
  latent_dim: [2, 16]
  beta: [0.5, 1.0, 2.0, 4.0]
  reduction: [sum, mean]
evaluate: {{iw_samples: {k}}}
"""


def warm_baselines(args: argparse.Namespace) -> None:
    """The raw-pixel baseline, computed once before both runs (cached in data_dir/.vaebench-cache)."""
    from vaebench.config import load_experiment
    from vaebench.matrix import expand
    from vaebench.results import baseline_for

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "study.yaml"
        path.write_text(MATRIX.format(data_dir=args.data_dir, epochs=1, compile="off", k=1,
                                      dataset=args.matrix_dataset, max_train=args.max_train or "null"))
        exp = load_experiment(path)
        t0 = time.perf_counter()
        baseline_for(exp, expand(exp)[0].settings)
        print(f"raw-pixel baseline ready in {time.perf_counter() - t0:.1f} s", flush=True)


def recorded_baseline(path: str) -> tuple[float, dict[str, tuple[float, int | None]], int]:
    """The one-cell-at-a-time side of an earlier full run of this script (its printed output):
    each cell's test/elbo and, where the run printed it, its best epoch."""
    import re

    text = Path(path).read_text()
    wall = float(re.search(r"one cell at a time (\d+(?:\.\d+)?) s", text).group(1))
    cells = {m.group(1): (float(m.group(2)), int(m.group(3)) if m.group(3) else None)
             for m in re.finditer(r"^  (\S+): (-?[\d.]+) vs \S+(?: \(best epoch (\d+) vs)?", text, re.M)}
    print(f"one-cell-at-a-time figures from {path}: {wall:.0f} s, {len(cells)} cells", flush=True)
    return wall, cells, 0


def part_matrix(args: argparse.Namespace) -> list[str]:
    from vaebench.config import load_experiment
    from vaebench.runner import parse_only, run_experiment

    only = parse_only(args.only) or None

    def run(pack: str, compile_: str, eval_workers: str) -> tuple[float, dict, int, list]:
        """Wall seconds, {cell: (test/elbo, best epoch)}, exit code, timeline."""
        import mlflow

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "study.yaml"
            path.write_text(MATRIX.format(data_dir=args.data_dir, epochs=args.matrix_epochs, compile=compile_,
                                          k=args.iw_samples, dataset=args.matrix_dataset,
                                          max_train=args.max_train or "null"))
            t0 = time.perf_counter()
            summary = run_experiment(load_experiment(path), only=only, pack=parse_pack(pack),
                                     eval_workers=eval_workers, progress=False, echo=lambda line: None)
            wall = time.perf_counter() - t0
            client = mlflow.MlflowClient(f"sqlite:///{tmp}/mlruns.db")
            exp = client.get_experiment_by_name("bench-gpu-matrix")
            runs = client.search_runs([exp.experiment_id], "tags.`vaebench.kind` = 'cell'")
            cells = {r.info.run_name: (r.data.metrics.get("test/elbo", float("nan")),
                                       int(r.data.metrics.get("train/best_epoch", -1))) for r in runs}
            return wall, cells, summary.exit_code, timeline(client, runs, summary.parent_run_id)

    warm_baselines(args)
    if args.baseline_from:  # a recorded one-at-a-time run of the same study (it takes ~11 min on an H100)
        base_wall, base, c1 = recorded_baseline(args.baseline_from)
    elif args.baseline_engine == "captured":  # one member a pack, its step captured: what --pack off does on CUDA
        base_wall, base, c1, _ = run("off", "auto", "auto")
    else:  # as before packing: eager, one at a time, evaluated in place
        base_wall, base, c1, _ = run("off", "off", "0")
    if args.baseline_from:
        source = f" (recorded: {args.baseline_from})"
    else:
        source = " (the captured engine, one member a pack)" if args.baseline_engine == "captured" else ""
    wall, packed, code, steps = run("auto", "auto", "auto")
    base = {k: v for k, v in base.items() if k in packed or not args.only}  # a recorded run of the whole study
    part = f" ({len(packed)} cells: --only {' '.join(args.only)})" if args.only else ""
    lines = [f"32-cell {args.matrix_dataset} study{part}, {args.matrix_epochs} epochs, k={args.iw_samples}: "
             f"one cell at a time {base_wall:.0f} s{source}, exit code {c1}"]
    if args.only and args.baseline_from:
        lines.append("  (the recorded time is the whole study's: compare the test/elbo, not the times)")
    diffs = [abs(base[k][0] - packed[k][0]) for k in base if k in packed] or [float("nan")]
    # the evaluated weights are each run's best epoch (by validation loss): twins that pick
    # different epochs are a whole epoch of training apart, whatever the rounding
    same = [abs(base[k][0] - packed[k][0]) for k in base if k in packed and base[k][1] == packed[k][1]]
    lines += [f"packed: {wall:.0f} s -> x{base_wall / wall:.1f} (exit code {code}); |test/elbo packed - "
              f"unpacked| max {max(diffs):.2f} nats, mean {statistics.mean(diffs):.2f} over {len(diffs)} cells; "
              f"over the {len(same)} whose best epoch is the same: max "
              f"{max(same, default=float('nan')):.2f}, mean {statistics.mean(same) if same else float('nan'):.2f}",
              *steps]
    nan = (float("nan"), None)
    lines += [f"  {k}: {base[k][0]:.2f} vs {packed.get(k, nan)[0]:.2f} (best epoch "
              f"{'?' if base[k][1] is None else base[k][1]} vs {packed.get(k, nan)[1]})" for k in sorted(base)]
    return lines


def timeline(client, runs: list, parent_id: str) -> list[str]:
    """Where a packed run's time went, per unit, from what MLflow recorded (seconds after the
    parent run started): runs opened, first and last epoch logged, last cell finished."""
    parent = client.get_run(parent_id).info
    t0 = parent.start_time
    out = [f"  timeline: whole run {(parent.end_time - t0) / 1000:.1f} s"]
    units: dict[str, list] = {}
    for r in runs:
        units.setdefault(r.data.tags.get("vaebench.pack.id", r.info.run_id), []).append(r)
    for unit in sorted(units.values(), key=lambda rs: min(r.info.start_time for r in rs)):
        stamps = [m.timestamp for r in unit for m in client.get_metric_history(r.info.run_id, "train/loss")]
        m = [r.data.metrics for r in unit]
        # the CPU part of each cell's evaluation ends by logging the final metrics (test/elbo's
        # timestamp) and took eval/cpu_seconds: when it started and ended, queueing included
        ends = [h[-1].timestamp for r in unit if (h := client.get_metric_history(r.info.run_id, "test/elbo"))]
        starts = [end - 1000 * x.get("eval/cpu_seconds", 0.0) for end, x in zip(ends, m)]
        name = unit[0].info.run_name.rsplit("-b", 1)[0]
        out.append(
            f"  unit {name} ({len(unit)} cells): opened +{(min(r.info.start_time for r in unit) - t0) / 1000:.1f}, "
            f"epochs logged +{(min(stamps) - t0) / 1000:.1f}..+{(max(stamps) - t0) / 1000:.1f}, "
            f"finished +{(max(r.info.end_time for r in unit) - t0) / 1000:.1f}; evaluation per cell: device "
            f"{statistics.mean(x.get('eval/device_seconds', float('nan')) for x in m):.2f} s, "
            f"CPU {statistics.mean(x.get('eval/cpu_seconds', float('nan')) for x in m):.2f} s")
        epoch_s = [h.value for r in unit for h in client.get_metric_history(r.info.run_id, "train/epoch_seconds")]
        if len(stamps) > len(unit) and epoch_s:  # by the clock (first epoch and capture left out) vs in the loop
            per = (max(stamps) - min(stamps)) / 1000 / (len(stamps) // len(unit) - 1)
            out.append(f"    an epoch: {per:.2f} s by the clock, {statistics.median(epoch_s):.2f} s in the training "
                       f"loop (train/epoch_seconds, median)")
        if ends:
            out.append(f"    CPU parts started +{(min(starts) - t0) / 1000:.1f}..+{(max(starts) - t0) / 1000:.1f}, "
                       f"ended +{(min(ends) - t0) / 1000:.1f}..+{(max(ends) - t0) / 1000:.1f}")
    return out


def apply_what_ifs(args: argparse.Namespace) -> list[str]:
    """Switch on the what-ifs asked for, in this process (training and the device part of the
    evaluation run here; the evaluation workers only score codes on the CPU); returns their names."""
    on = []
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
        on.append("cudnn.benchmark")
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
        on.append(f"switch interval {args.switch_interval:g} s")
    return on


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["loops", "matrix", "all"], default="all")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-dir", default=os.environ.get("VAEBENCH_DATA_DIR", str(ROOT / "data")))
    p.add_argument("--epochs", type=int, default=3, help="epochs per loop measurement (the first is warm-up)")
    p.add_argument("--max-train", type=int, default=None, help="train on the first N images (dry runs)")
    p.add_argument("--packs", type=int, nargs="+", default=[8, 32])
    p.add_argument("--matrix-epochs", type=int, default=10)
    p.add_argument("--matrix-dataset", default="mnist", help="dry runs: digits")
    p.add_argument("--baseline-from", metavar="LOG", help="take the one-cell-at-a-time side from an earlier run's output")
    p.add_argument("--baseline-engine", choices=["plain", "captured"], default="plain",
                   help="the one-cell-at-a-time side: the eager plain loop evaluated in place, as before packing "
                        "(default), or the packed engine with one member, captured (--pack off's default on CUDA): "
                        "then the two sides differ by the packing alone")
    p.add_argument("--iw-samples", type=int, default=1000)
    p.add_argument("--only", action="append", default=[], metavar="SETTING=VALUE",
                   help="run only these cells of the matrix on both sides, as `vaebench run --only`")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="what-if: cuDNN's autotuner on for everything measured (both sides of the study)")
    p.add_argument("--switch-interval", type=float, metavar="SECONDS",
                   help="what-if: sys.setswitchinterval (how long a thread may hold the GIL; Python's 0.005) "
                        "in the trainer's process, where the tracking thread logs beside the training loop")
    args = p.parse_args()
    device_of(p, args)  # --device cuda without CUDA: one argparse error
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    what_if = apply_what_ifs(args)
    name += f" ({', '.join(what_if)})" if what_if else ""
    from vaebench.train import float32_math

    print(f"device: {name}; torch {torch.__version__}; float32 math: {float32_math(torch.device(args.device))}",
          flush=True)
    from vaebench.data import DatasetUnavailable

    lines = []
    try:
        if args.part in ("loops", "all"):
            lines += part_loops(args)
        if args.part in ("matrix", "all"):
            lines += part_matrix(args)
    except DatasetUnavailable as e:  # one message, not a traceback
        raise SystemExit(f"{e}\n(a dry run: --part matrix --matrix-dataset digits)") from None
    print("\n".join([f"device: {name}", *lines]))


if __name__ == "__main__":
    sys.exit(main())
