"""Executes the RunSpecs of an experiment: skip what is finished, resume what was interrupted,
train and evaluate the rest, and summarise. A failed cell never stops the others.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import yaml

from vaebench import tracking
from vaebench.config import Experiment, RunSettings
from vaebench.matrix import RunSpec, expand, same_value, setting_value

if TYPE_CHECKING:  # annotations only: runner imports torch lazily
    from vaebench.data import Dataset
    from vaebench.models import AutoEncoder
    from vaebench.train import TrainResult

Printer = Callable[[str], None]


class SelectionError(ValueError):
    """A bad `--only` filter (unknown setting, or no cell matches)."""


@dataclass
class CellResult:
    spec: RunSpec
    status: str  # trained | resumed | skipped | failed; for re-evaluation: evaluated | missing
    run_id: str | None = None
    seconds: float = 0.0
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


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
        out.setdefault(key, []).append(yaml.safe_load(value))
    return out


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


def run_experiment(exp: Experiment, *, only: dict[str, list[Any]] | None = None, force: bool = False,
                   jobs: int = 1, progress: bool = True, echo: Printer = print,
                   should_stop: Callable[[], bool] | None = None) -> Summary:
    """Train and evaluate every selected cell that has no finished run (all with `force`), in this
    process or in `jobs` worker processes; returns the summary. A KeyboardInterrupt (or
    `should_stop()` turning true, polled between batches and cells) marks the running cells and the
    parent run KILLED (resumable) and propagates as KeyboardInterrupt."""
    from tqdm.auto import tqdm

    specs = select(expand(exp), only or {})
    tracker = tracking.connect(exp.resolved_tracking_uri(), exp.name)
    existing = tracking.runs_by_key(tracker)
    parent_id = tracking.start_run(tracker, f"sweep-{time.strftime('%Y%m%d-%H%M%S')}", {
        tracking.TAG_KIND: "parent", "vaebench.file": str(exp.path), "vaebench.cells": len(specs),
        "vaebench.axes": ",".join(exp.matrix), "vaebench.jobs": jobs, **tracking.machine_tags()})
    results: list[CellResult] = []
    todo: list[tuple[RunSpec, str | None]] = []  # (cell, run to resume)
    for spec in specs:
        previous = existing.get(spec.key, [])
        finished = next((r for r in previous if r.info.status == "FINISHED"), None)
        if finished is not None and not force:
            results.append(CellResult(spec, "skipped", finished.info.run_id))
            echo(f"{spec.name}: skipped, finished as run {finished.info.run_id}")
            continue
        unfinished = None if force else next((r for r in previous if r.info.status != "FINISHED"), None)
        todo.append((spec, unfinished.info.run_id if unfinished else None))
    echo(f"experiment {exp.name!r}: {len(specs)} cells, {len(todo)} to train"
         f"{f' in {jobs} processes' if jobs > 1 and len(todo) > 1 else ''}; tracking at {tracker.uri}")
    status = "FINISHED"
    try:
        bar = tqdm(total=len(todo), desc="cells", unit="run", disable=not progress or not todo)
        for i, result in enumerate(_execute(exp, todo, tracker, parent_id, jobs, progress, should_stop)):
            results.append(result)
            bar.update()
            echo(f"[{i + 1}/{len(todo)}] {result.spec.name}: {result.status} in {result.seconds:.1f}s" +
                 (f" - {result.error}" if result.error else _headline(result.metrics)))
        bar.close()
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        summary = Summary(results, parent_id)
        tracking.log_metrics(tracker, parent_id, {
            "cells/trained": len(summary.of("trained", "resumed")),
            "cells/skipped": len(summary.of("skipped")), "cells/failed": len(summary.of("failed"))})
        tracking.finish(tracker, parent_id, status)
    return summary


def _execute(exp: Experiment, todo: list[tuple[RunSpec, str | None]], tracker: tracking.Tracker,
             parent_id: str, jobs: int, progress: bool,
             should_stop: Callable[[], bool] | None) -> Iterator[CellResult]:
    """Run the cells in this process (jobs=1), or in a pool of `jobs` processes (spawned: CUDA-safe)
    that split the CPU threads between them; yields results as cells finish."""
    if jobs <= 1 or len(todo) <= 1:
        for spec, resume_id in todo:
            if should_stop is not None and should_stop():
                raise KeyboardInterrupt("stop requested")
            yield run_cell(exp, spec, tracker, parent_id, resume_run_id=resume_id, progress=progress,
                           should_stop=should_stop)
        return
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(threads,)) as pool:
        futures = [pool.submit(_cell_in_worker, exp, spec, tracker.uri, parent_id, resume_id)
                   for spec, resume_id in todo]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


_WORKER: dict[str, Any] = {}  # per worker process: its tracker, reused across cells


def _init_worker(threads: int) -> None:
    import signal
    import threading

    import torch

    torch.set_num_threads(threads)
    # Ctrl-C reaches the whole process group: workers stop at their next batch, cleanly.
    _WORKER["stop"] = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: _WORKER["stop"].set())


def _cell_in_worker(exp: Experiment, spec: RunSpec, uri: str, parent_id: str, resume_id: str | None) -> CellResult:
    if "tracker" not in _WORKER:
        _WORKER["tracker"] = tracking.connect(uri, exp.name)
    stop = _WORKER["stop"]
    if stop.is_set():
        raise KeyboardInterrupt("stop requested")
    return run_cell(exp, spec, _WORKER["tracker"], parent_id, resume_run_id=resume_id, progress=False,
                    should_stop=stop.is_set)


def _headline(metrics: dict[str, float]) -> str:
    keys = [k for k in ("test/elbo", "test/nll_iw", "test/recon_mse") if k in metrics]
    return (" - " + ", ".join(f"{k} {metrics[k]:.4g}" for k in keys)) if keys else ""


def run_cell(exp: Experiment, spec: RunSpec, tracker: tracking.Tracker, parent_id: str | None, *,
             resume_run_id: str | None = None, progress: bool = True,
             should_stop: Callable[[], bool] | None = None) -> CellResult:
    """Train and evaluate one cell in its own MLflow run (continuing `resume_run_id` from its last
    checkpoint when given). Errors are recorded on the run and returned, never raised, except a
    KeyboardInterrupt, which marks the run KILLED (resumable) and propagates."""
    t0 = time.perf_counter()
    run_id = resume_run_id
    resume = None
    try:
        if run_id is not None:
            resume = tracking.load_torch(tracker, run_id, tracking.CHECKPOINT_PATH)
            if resume is None:  # interrupted before its first checkpoint: nothing to continue
                tracking.finish(tracker, run_id, "FAILED")
                run_id = None
        if run_id is None:
            run_id = tracking.start_run(tracker, spec.name, {
                tracking.TAG_KIND: "cell", tracking.TAG_RUN_KEY: spec.key,
                **{axis: tracking.tag_value(v) for axis, v in spec.axes.items()}}, parent_id)
        else:
            tracker.client.update_run(run_id, status="RUNNING")
            tracking.set_tags(tracker, run_id, {"vaebench.resumed_from_epoch": resume["epoch"]})
        metrics = _train_and_log(exp, spec, tracker, run_id, resume, progress, should_stop)
        tracking.finish(tracker, run_id, "FINISHED")
        return CellResult(spec, "resumed" if resume else "trained", run_id, time.perf_counter() - t0, metrics=metrics)
    except KeyboardInterrupt:
        if run_id is not None:
            tracking.finish(tracker, run_id, "KILLED")
        raise
    except Exception as e:  # noqa: BLE001 - one bad cell must not stop the sweep
        message = f"{type(e).__name__}: {e}"
        if run_id is not None:
            tracking.set_tags(tracker, run_id, {tracking.TAG_ERROR: message,
                                                "vaebench.traceback": traceback.format_exc()[-4000:]})
            tracking.finish(tracker, run_id, "FAILED")
        return CellResult(spec, "failed", run_id, time.perf_counter() - t0, error=message)


def _train_and_log(exp: Experiment, spec: RunSpec, tracker: tracking.Tracker, run_id: str,
                   resume: dict | None, progress: bool,
                   should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
    from vaebench.data import load_dataset
    from vaebench.train import train

    s = spec.settings
    data = load_dataset(s.dataset, exp.resolved_data_dir(), options=s.data_config)
    if resume is None:
        tracking.log_params(tracker, run_id, spec.params())
        tracking.set_tags(tracker, run_id, {tracking.TAG_SOURCE: data.source})
        tracking.log_json(tracker, run_id, "config/cell.json", {
            "name": spec.name, "run_key": spec.key, "axes": spec.axes,
            "settings": s.model_dump(mode="json"), "experiment": exp.name, "file": str(exp.path)})
    already = tracking.logged_steps(tracker, run_id, "train/loss") if resume else set()

    def on_epoch_end(epoch: int, metrics: dict[str, float], checkpoint: dict) -> None:
        # Checkpoint first, then metrics: a crash in between re-logs nothing twice on resume,
        # since the epoch's metrics are also kept in the checkpoint's history.
        tracking.log_torch(tracker, run_id, tracking.CHECKPOINT_PATH, checkpoint)
        tracking.log_metrics(tracker, run_id, metrics, step=epoch)

    if resume:  # the epoch whose checkpoint landed but whose metrics did not
        for epoch, metrics in enumerate(resume["history"]):
            if epoch not in already:
                tracking.log_metrics(tracker, run_id, metrics, step=epoch)

    result = train(s, data, resume=resume, on_epoch_end=on_epoch_end, progress=progress,
                   should_stop=should_stop)
    return log_trained(exp, s, data, result, tracker, run_id)


def log_trained(exp: Experiment, s: RunSettings, data: Dataset, result: TrainResult,
                tracker: tracking.Tracker, run_id: str) -> dict[str, float]:
    """After training: log the final model, run the evaluation protocol, log the final metrics;
    returns them (matrix cells and Optuna trials alike)."""
    final = {"train/seconds": result.train_seconds, "train/epochs_run": result.epochs_run,
             "train/best_epoch": result.best_epoch}
    tracking.set_tags(tracker, run_id, {"vaebench.stopped_early": result.stopped_early,
                                        "vaebench.device": str(result.device)})
    tracking.log_torch(tracker, run_id, tracking.MODEL_PATH, {
        "state_dict": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
        "settings": s.model_dump(mode="json"), "in_shape": list(result.model.in_shape)})
    tracking.log_metrics(tracker, run_id, final, step=result.epochs_run)
    # evaluate_and_log logs its own metrics: returned here, not logged a second time
    final.update(evaluate_and_log(exp, s, result.model, data, result.history, tracker, run_id,
                                  step=result.epochs_run))
    return final


def evaluate_and_log(exp: Experiment, s: RunSettings, model: AutoEncoder, data: Dataset,
                     history: list[dict[str, float]], tracker: tracking.Tracker, run_id: str,
                     step: int) -> dict[str, float]:
    """Run the evaluation protocol on a trained model and log its test/* metrics, the dataset's
    raw-pixel baseline, the per-dim KL table and the figures to `run_id`."""
    import tempfile

    from vaebench.batches import to_device
    from vaebench.evaluate import evaluate, pixel_baseline
    from vaebench.losses import effective_beta

    device = next(model.parameters()).device
    opts = dict(image_size=s.image_size, binarization=s.binarization)
    test = to_device(data.test, device, **opts)
    protocol = exp.evaluate
    # the training split is only needed to fit the kNN / probe and for the pixel baseline
    train = to_device(data.train, device, **opts) if protocol.clustering else None
    evaluation = evaluate(model, test, s, protocol, train=train, num_classes=data.num_classes)
    c, h, w = test.shape
    final = {f"test/{k}": v for k, v in evaluation.metrics.items()}
    final["effective_beta"] = effective_beta(s.beta, s.reduction, c * h * w)
    if protocol.clustering:
        key = _baseline_key(s, protocol)
        baseline = pixel_baseline(train, test, data.num_classes, protocol, key,
                                  cache_dir=exp.resolved_data_dir() / ".vaebench-cache")
        final.update({f"baseline/{k}": v for k, v in baseline.items()})
    tracking.log_metrics(tracker, run_id, final, step=step)
    if evaluation.not_applicable:
        tracking.set_tags(tracker, run_id, {tracking.TAG_NOT_APPLICABLE:
                                            ",".join(f"test/{k}" for k in evaluation.not_applicable)})
    if evaluation.kl_per_dim:
        rows = "dim,kl\n" + "".join(f"{i},{v:.6g}\n" for i, v in enumerate(evaluation.kl_per_dim))
        tracking.log_text(tracker, run_id, "eval/kl_per_dim.csv", rows)
    if protocol.figures:
        from vaebench.figures import draw_run_figures

        with tempfile.TemporaryDirectory() as tmp:
            draw_run_figures(model, test, history, tmp, likelihood=s.likelihood)
            tracker.client.log_artifacts(run_id, tmp, "figures")
    return final


def _baseline_key(s: RunSettings, protocol) -> str:
    import hashlib
    import json

    what = {"dataset": s.dataset, "options": s.data_config, "image_size": s.image_size,
            "binarization": s.binarization,
            "protocol": protocol.model_dump(include={"max_test_samples", "probe_train_samples",
                                                     "silhouette_samples", "knn_neighbors", "kmeans_restarts"})}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def evaluate_experiment(exp: Experiment, *, only: dict[str, list[Any]] | None = None,
                        overrides: dict[str, Any] | None = None, echo: Printer = print) -> Summary:
    """Redo the evaluation of every finished cell from its saved model, without retraining (for
    example with a larger k: `overrides={"iw_samples": 5000}`). The new test/* metrics are logged
    to the same runs."""
    from vaebench.data import load_dataset
    from vaebench.train import build_for, resolve_device

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
            data = load_dataset(s.dataset, exp.resolved_data_dir(), options=s.data_config)
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
