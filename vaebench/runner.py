"""Executes the RunSpecs of an experiment: skip what is finished, resume what was interrupted,
plan the rest into units of work (vaebench.plan), run them through an executor
(vaebench.executors), and summarise. A failed cell never stops the others.

Also `evaluate_experiment`: the evaluation protocol again on finished runs, without retraining.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import yaml

from vaebench import tracking
from vaebench.config import Experiment
from vaebench.matrix import RunSpec, expand, same_value, setting_value
from vaebench.results import CellResult

Printer = Callable[[str], None]


class SelectionError(ValueError):
    """A bad `--only` filter (unknown setting, or no cell matches)."""


@dataclass
class Summary:
    results: list[CellResult]
    parent_run_id: str | None = None

    def of(self, *statuses: str) -> list[CellResult]:
        return [r for r in self.results if r.status in statuses]

    @property
    def exit_code(self) -> int:
        return 1 if self.of("failed") else 0

    def lines(self) -> list[str]:
        if self.of("evaluated") or not self.results or all(r.status == "missing" for r in self.results):
            head = (f"{len(self.of('evaluated'))} evaluated, {len(self.of('missing'))} not trained yet "
                    f"(skipped), {len(self.of('failed'))} failed")
        else:
            head = (f"{len(self.of('trained', 'resumed'))} trained ({len(self.of('resumed'))} resumed), "
                    f"{len(self.of('skipped'))} skipped (already finished), {len(self.of('failed'))} failed")
        out = [head]
        out += [f"  FAILED {r.spec.name} [{r.spec.key}]: {r.error}" for r in self.of("failed")]
        return out


# --- selecting cells ---------------------------------------------------------------------------


def parse_only(items: list[str]) -> dict[str, list[Any]]:
    """`--only arch=conv --only beta=4 --only beta=1` -> {arch: [conv], beta: [4, 1]}: the same key
    twice means either value, different keys must all match."""
    from vaebench.config import SETTING_NAMES

    out: dict[str, list[Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SelectionError(f"--only {item!r}: expected SETTING=VALUE, e.g. --only arch=conv")
        if key.split(".")[0] not in SETTING_NAMES:
            raise SelectionError(f"--only {item!r}: unknown setting {key!r}; allowed: {', '.join(SETTING_NAMES)}")
        # no run setting is a boolean: YAML 1.1's `off`, `on`, `yes`, `no` mean the words (compile=off)
        out.setdefault(key, []).append(value if value.strip().lower() in YAML11_WORDS else yaml.safe_load(value))
    return out


YAML11_WORDS = {"on", "off", "yes", "no", "y", "n"}


def select(specs: list[RunSpec], only: dict[str, list[Any]]) -> list[RunSpec]:
    if not only:
        return specs
    chosen = [s for s in specs if all(any(_selects(setting_value(s, k), v) for v in vs) for k, vs in only.items())]
    if not chosen:
        raise SelectionError(f"no cell of the matrix matches --only {only}")
    return chosen


def _selects(have: Any, want: Any) -> bool:
    # on the command line everything is text: `--only kl_anneal.schedule=none` etc.
    return same_value(have, want) or str(have) == str(want)


# --- running -----------------------------------------------------------------------------------


@dataclass
class RayOptions:
    """`--executor ray`: where the cluster is, and what each unit asks of it (vaebench.cluster)."""

    address: str | None = None  # auto | HOST:PORT | ray://... ; None: RAY_ADDRESS or a new local cluster
    gpus: float | None = None  # per unit; None: 1 when the cluster has GPUs, else 0
    cpus: float = 1.0  # per unit


def run_experiment(exp: Experiment, *, only: dict[str, list[Any]] | None = None, force: bool = False,
                   jobs: int = 1, pack: str | int = "auto", eval_workers: str | int = "auto", progress: bool = True,
                   echo: Printer = print, should_stop: Callable[[], bool] | None = None,
                   ray: RayOptions | None = None) -> Summary:
    """Train and evaluate every selected cell that has no finished run (all with `force`); returns
    the summary. The cells go in units (vaebench.plan: packs of cells that share a step, on CUDA
    by default; `pack` = auto | off | N) through an executor (this process, `jobs` worker
    processes, or with `ray` tasks on a Ray cluster); with `eval_workers` the CPU part of the
    evaluation runs in that many processes (auto: on CUDA, where the device would otherwise wait
    for it). A KeyboardInterrupt (or `should_stop()`
    turning true, polled between steps and units) marks the running cells and the parent run KILLED
    (resumable) and propagates as KeyboardInterrupt."""
    from tqdm.auto import tqdm

    from vaebench.executors import LocalExecutor, PoolExecutor, RayExecutor
    from vaebench.plan import make_units, pack_limit
    from vaebench.results import Evaluator, PoolEvaluator
    from vaebench.train import resolve_device
    from vaebench.units import Cell

    specs = select(expand(exp), only or {})
    tracker = tracking.connect(exp.resolved_tracking_uri(), exp.name)
    existing = tracking.runs_by_key(tracker)
    results: list[CellResult] = []
    todo: list[Cell] = []
    for spec in specs:
        previous = existing.get(spec.key, [])
        finished = next((r for r in previous if r.info.status == "FINISHED"), None)
        if finished is not None and not force:
            results.append(CellResult(spec, "skipped", finished.info.run_id))
            echo(f"{spec.name}: skipped, finished as run {finished.info.run_id}")
            continue
        unfinished = None if force else next((r for r in previous if r.info.status != "FINISHED"), None)
        todo.append(Cell(spec, unfinished.info.run_id if unfinished else None))
    if ray is not None:  # the cluster's devices decide, not this machine's
        from vaebench import cluster

        device_type = "cuda" if todo and cluster.gpus(cluster.connect(ray.address)) else "cpu"
        gpus, workers = 0, 0  # each task evaluates its own cells
    else:
        device = resolve_device(todo[0].spec.settings.device) if todo else None
        device_type = device.type if device else "cpu"
        gpus = _gpu_count() if device_type == "cuda" else 0
        workers = _eval_workers(eval_workers, device_type, jobs)
    units = make_units(todo, lambda c: c.spec.settings, pack_limit(pack, device_type))
    packed = sum(len(u) for u in units if len(u) > 1)
    parent_id = tracking.start_run(tracker, f"sweep-{time.strftime('%Y%m%d-%H%M%S')}", {
        tracking.TAG_KIND: "parent", "vaebench.file": str(exp.path), "vaebench.cells": len(specs),
        "vaebench.axes": ",".join(exp.matrix), "vaebench.jobs": jobs, "vaebench.pack": pack,
        "vaebench.executor": "ray" if ray else ("pool" if jobs > 1 else "local"),
        "vaebench.units": len(units), "vaebench.eval_workers": workers, **tracking.machine_tags()})
    how = []
    if ray is not None:
        how.append("as Ray tasks")
    elif jobs > 1 and len(units) > 1:
        how.append(f"{jobs} processes")
    if packed:
        how.append(f"{packed} of them packed into {sum(len(u) > 1 for u in units)} groups")
    if workers:
        how.append(f"evaluation in {workers} worker processes")
    echo(f"experiment {exp.name!r}: {len(specs)} cells, {len(todo)} to train in {len(units)} units"
         f"{' (' + '; '.join(how) + ')' if how else ''}; tracking at {tracker.uri}")
    background = tracking.Background()
    evaluator = PoolEvaluator(exp, tracker, background, workers) if workers else Evaluator(exp, tracker, background)
    status = "FINISHED"
    try:
        evaluator.baselines([c.spec.settings for c in todo])  # before any cell is trained
        if ray is not None:
            executor: Any = RayExecutor(exp, tracker, parent_id, address=ray.address, gpus=ray.gpus, cpus=ray.cpus)
        elif jobs > 1 and len(units) > 1:
            executor = PoolExecutor(exp, tracker, parent_id, jobs, gpus=gpus if gpus > 1 else 0)
        else:
            executor = LocalExecutor(exp, tracker, parent_id, evaluator, background, progress=progress,
                                     should_stop=should_stop)
        bar = tqdm(total=len(todo), desc="cells", unit="run", disable=not progress or not todo)
        for i, result in enumerate(executor.run(units)):
            results.append(result)
            bar.update()
            echo(f"[{i + 1}/{len(todo)}] {result.spec.name}: {result.status} in {result.seconds:.1f}s" +
                 (f" - {result.error}" if result.error else _headline(result.metrics)))
        bar.close()
    except KeyboardInterrupt:
        status = "KILLED"
        for run_id in evaluator.pending_runs():
            background.submit(tracking.finish, tracker, run_id, "KILLED")
        raise
    finally:
        evaluator.close(cancel=status == "KILLED")
        background.close()
        summary = Summary(results, parent_id)
        tracking.log_metrics(tracker, parent_id, {
            "cells/trained": len(summary.of("trained", "resumed")),
            "cells/skipped": len(summary.of("skipped")), "cells/failed": len(summary.of("failed"))})
        tracking.finish(tracker, parent_id, status)
    return summary


EVAL_WORKERS_MAX = 8


def _eval_workers(setting: str | int, device_type: str, jobs: int) -> int:
    """`auto`: on CUDA (one process owns the GPU) the CPU part of evaluation goes to worker
    processes, leaving two cores to the trainer; on the CPU it runs in place (there are no idle
    cores to give it). With `--jobs` the workers evaluate their own cells."""
    if jobs > 1:
        return 0
    if setting != "auto":
        return int(setting)
    if device_type != "cuda":
        return 0
    return max(1, min(EVAL_WORKERS_MAX, (os.cpu_count() or 1) - 2))


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _headline(metrics: dict[str, float]) -> str:
    keys = [k for k in ("test/elbo", "test/nll_iw", "test/recon_mse") if k in metrics]
    return (" - " + ", ".join(f"{k} {metrics[k]:.4g}" for k in keys)) if keys else ""


def evaluate_experiment(exp: Experiment, *, only: dict[str, list[Any]] | None = None,
                        overrides: dict[str, Any] | None = None, echo: Printer = print) -> Summary:
    """Redo the evaluation of every finished cell from its saved model, without retraining (for
    example with a larger k: `overrides={"iw_samples": 5000}`). The new test/* metrics are logged
    to the same runs."""
    from vaebench.results import evaluate_and_log
    from vaebench.train import build_for, dataset_for, resolve_device

    if overrides:
        exp = exp.model_copy(update={"evaluate": exp.evaluate.model_validate(
            {**exp.evaluate.model_dump(), **overrides})})
    specs = select(expand(exp), only or {})
    tracker = tracking.connect(exp.resolved_tracking_uri(), exp.name)
    existing = tracking.runs_by_key(tracker)
    results: list[CellResult] = []
    for i, spec in enumerate(specs):
        prefix = f"[{i + 1}/{len(specs)}] {spec.name}"
        run = next((r for r in existing.get(spec.key, []) if r.info.status == "FINISHED"), None)
        if run is None:
            results.append(CellResult(spec, "missing"))
            echo(f"{prefix}: no finished run to evaluate (train it with `vaebench run`)")
            continue
        t0 = time.perf_counter()
        run_id = run.info.run_id
        try:
            s = spec.settings
            saved = tracking.load_torch(tracker, run_id, tracking.MODEL_PATH)
            if saved is None:
                raise FileNotFoundError(f"run {run_id} has no {tracking.MODEL_PATH} artifact")
            model = build_for(s, tuple(saved["in_shape"]))
            model.load_state_dict(saved["state_dict"])
            model.to(resolve_device(s.device))
            checkpoint = tracking.load_torch(tracker, run_id, tracking.CHECKPOINT_PATH) or {}
            data = dataset_for(s, exp.resolved_data_dir())
            step = int(run.data.metrics.get("train/epochs_run", 0))
            metrics = evaluate_and_log(exp, s, model, data, checkpoint.get("history", []), tracker, run_id, step)
            tracking.set_tags(tracker, run_id, {"vaebench.evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
            result = CellResult(spec, "evaluated", run_id, time.perf_counter() - t0, metrics=metrics)
        except Exception as e:  # noqa: BLE001 - one bad run must not stop the others
            result = CellResult(spec, "failed", run_id, time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")
        results.append(result)
        echo(f"{prefix}: {result.status} in {result.seconds:.1f}s" +
             (f" - {result.error}" if result.error else _headline(result.metrics)))
    return Summary(results)
