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

from vaebench import claims, tracking
from vaebench.config import Experiment
from vaebench.matrix import RunSpec, expand, has_value, setting_value
from vaebench.results import CellResult

Printer = Callable[[str], None]


class SelectionError(ValueError):
    """A bad `--only` filter (unknown setting, or no cell matches), or cells that ask for a device
    this machine lacks."""


@dataclass
class Summary:
    results: list[CellResult]
    parent_run_id: str | None = None
    not_run: int = 0  # cells not finished (not started, or stopped) because --fail-fast stopped the sweep

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
            earlier = [r for r in self.of("failed") if r.earlier]
            if earlier:
                head += f" ({len(earlier)} earlier, not retried)"
            if self.of("claimed"):
                head += f", {len(self.of('claimed'))} left to other runners"
        out = [head]
        if self.not_run:
            out.append(f"stopped at the first failure (--fail-fast): {plural(self.not_run, 'cell')} not finished "
                       "(not started, or stopped: KILLED); run the same command again to continue")
        fixes: set[str] = set()
        for r in self.of("failed"):
            out.append(f"  FAILED {r.spec.name} [{r.spec.key}]: {r.error}")
            if r.fix and r.fix not in fixes:  # what to do about it, once for the cells it holds back
                fixes.add(r.fix)
                out += [f"    {line}" for line in r.fix.splitlines()]
        out += [f"  {r.spec.name} [{r.spec.key}]: {r.note}" for r in self.of("claimed")]
        return out


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


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


TAG_OWNER = "vaebench.owner"  # a sweep's process, "host:pid:start" (claims.owner_id)


def _end_dead_sweeps(tracker: tracking.Tracker) -> None:
    """Mark KILLED the sweeps (parent runs) left RUNNING by a process of this machine that is gone
    (killed outright, the machine restarted): their cells resume under the new sweep, and the
    old one would otherwise show as running forever. Other machines' sweeps are left alone."""
    now = time.time()
    for run in tracking.search(tracker, f"tags.`{tracking.TAG_KIND}` = 'parent' and attributes.status = 'RUNNING'"):
        owner = run.data.tags.get(TAG_OWNER)
        if owner and not claims.owner_alive(owner, now, now):
            tracking.set_tags(tracker, run.info.run_id, {"vaebench.ended": "its process was gone"})
            tracking.finish(tracker, run.info.run_id, "KILLED")


def select(specs: list[RunSpec], only: dict[str, list[Any]]) -> list[RunSpec]:
    if not only:
        return specs
    chosen = [s for s in specs if all(any(_selects(setting_value(s, k), v) for v in vs) for k, vs in only.items())]
    if not chosen:
        # say which filter matched nothing, with the values the matrix has for it
        for key, wanted in only.items():
            values = list(dict.fromkeys(str(setting_value(s, key)) for s in specs))
            if not any(_selects(setting_value(s, key), v) for s in specs for v in wanted):
                raise SelectionError(f"--only {key}={','.join(map(str, wanted))}: no cell has that value; "
                                     f"the matrix has {key} = {', '.join(values[:20])}"
                                     + (f" (and {len(values) - 20} more)" if len(values) > 20 else ""))
        raise SelectionError(f"no cell of the matrix matches all of --only {only} at once")
    return chosen


def _selects(have: Any, want: Any) -> bool:
    # on the command line everything is text: `--only kl_anneal.schedule=none` etc.
    return has_value(have, want) or str(have) == str(want)


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
                   retry_failed: bool = False, fail_fast: bool = False, ray: RayOptions | None = None) -> Summary:
    """Train and evaluate every selected cell that has no finished run (all with `force`); returns
    the summary. What happens to a cell with earlier attempts is vaebench.attempts' policy (an
    interrupted or environment-failed attempt resumes; a deterministic failure is left failed
    unless `retry_failed`). The cells go in units (vaebench.plan: packs of cells that share a step,
    on CUDA by default; `pack` = auto | off | N) through an executor (this process, `jobs` worker
    processes, or with `ray` tasks on a Ray cluster); with `eval_workers` the CPU part of the
    evaluation runs in that many processes (auto: on CUDA, where the device would otherwise wait
    for it).

    Several runners may work on one store at once: each cell is claimed before it is trained
    (vaebench.claims). Cells that another runner holds are waited for at the end: taken over if
    that runner stops (its claim expires), skipped once it finishes them.

    `fail_fast`: the first cell that fails in this invocation stops the sweep (no further unit
    starts, the running ones stop at their next batch and end KILLED, resumable). A
    KeyboardInterrupt (or `should_stop()` turning true, polled between steps and units) marks the
    running cells and the parent run KILLED (resumable) and propagates as KeyboardInterrupt."""
    from vaebench.attempts import decide
    from vaebench.results import Evaluator, PoolEvaluator
    from vaebench.train import resolve_device

    specs = select(expand(exp), only or {})
    tracker = tracking.connect(exp.resolved_tracking_uri(), exp.name, echo)
    existing = tracking.runs_by_key(tracker)
    force_since = int(time.time() * 1000) if force else None
    results: list[CellResult] = []
    todo: list[Any] = []
    for spec in specs:
        decision = decide(existing.get(spec.key, []), force_since=force_since, retry_failed=retry_failed)
        if decision.action == "skip":
            results.append(CellResult(spec, "skipped", decision.run_id))
            echo(f"{spec.name}: skipped, finished as run {decision.run_id}")
        elif decision.action == "give_up":
            results.append(CellResult(spec, "failed", decision.run_id, error=decision.reason, earlier=True))
            echo(f"{spec.name}: {decision.reason}")
        else:
            todo.append(_cell(spec, decision.run_id if decision.action == "resume" else None, force_since,
                              retry_failed))
    if ray is not None:  # the cluster's devices decide, not this machine's
        from vaebench import cluster

        device_type = "cuda" if todo and cluster.gpus(cluster.connect(ray.address)) else "cpu"
        gpus, workers = 0, 0  # each task evaluates its own cells
    else:
        _check_devices(exp, todo)
        device = resolve_device(todo[0].spec.settings.device) if todo else None
        device_type = device.type if device else "cpu"
        gpus = _gpu_count() if device_type == "cuda" else 0
        # no more workers than cells to evaluate: each starts at once (results.PoolEvaluator)
        workers = min(_eval_workers(eval_workers, device_type, jobs), len(todo))
    units = _units(todo, pack, device_type)
    packed = sum(len(u) for u in units if len(u) > 1)
    _end_dead_sweeps(tracker)
    parent_id = tracking.start_run(tracker, f"sweep-{time.strftime('%Y%m%d-%H%M%S')}", {
        tracking.TAG_KIND: "parent", "vaebench.file": str(exp.path), "vaebench.cells": len(specs),
        "vaebench.axes": ",".join(exp.matrix), "vaebench.jobs": jobs, "vaebench.pack": pack,
        "vaebench.executor": "ray" if ray else ("pool" if jobs > 1 else "local"),
        "vaebench.units": len(units), "vaebench.eval_workers": workers, TAG_OWNER: claims.owner_id(),
        **tracking.machine_tags()})
    how = []
    if ray is not None:
        how.append("as Ray tasks")
    elif jobs > 1 and len(units) > 1:
        how.append(f"{jobs} processes")
    if packed:
        how.append(f"{packed} of them packed into {plural(sum(len(u) > 1 for u in units), 'group')}")
    if workers:
        how.append(f"evaluation in {workers} worker processes")
    echo(f"experiment {exp.name!r}: {plural(len(specs), 'cell')}, {len(todo)} to train in {plural(len(units), 'unit')}"
         f"{' (' + '; '.join(how) + ')' if how else ''}; tracking at {tracker.uri}")
    background = tracking.Background()
    evaluator = (PoolEvaluator(exp, tracker, background, workers, echo=echo) if workers
                 else Evaluator(exp, tracker, background))
    failed_here = lambda: fail_fast and evaluator.failures > 0  # noqa: E731 - failed in this process
    stop = lambda: failed_here() or (should_stop is not None and should_stop())  # noqa: E731
    sweep = _Sweep(exp, tracker, parent_id, jobs, gpus, evaluator, background, progress, echo, stop, fail_fast,
                   len(todo), ray)
    status = "FINISHED"
    try:
        evaluator.baselines([c.spec.settings for c in todo])  # before any cell is trained
        try:
            sweep.run(units)
            while not sweep.stopping:  # cells other runners held: wait, then take over or skip them
                waiting = [r for r in sweep.results if r.status == "claimed"]
                if not waiting:
                    break
                free = _wait_for_others(tracker, waiting, echo, stop)
                sweep.results = [r for r in sweep.results if r not in free]
                sweep.run(_units([_cell(r.spec, None, force_since, retry_failed) for r in free], pack, device_type))
        except KeyboardInterrupt:
            if not (sweep.stopping or failed_here()):
                raise
            sweep.results += evaluator.drain()  # --fail-fast: what finished training still ends well
        if sweep.stopping or failed_here():
            status = "FAILED"
    except BaseException:  # Ctrl-C, or anything else that ends the sweep early (its output closed, ...)
        status = "KILLED"
        try:  # the evaluations in hand end as usual; the queued ones end KILLED (resumable)
            for result in evaluator.interrupt():
                sweep.keep(result)
        finally:
            for run_id, key in zip(evaluator.pending_runs(), evaluator.pending_keys()):
                background.submit(tracking.finish, tracker, run_id, "KILLED")
                background.submit(claims.release, tracker, key)
        raise
    finally:
        results += sweep.results
        summary = Summary(results, parent_id)
        if status == "FAILED":
            done = {r.spec.key for r in results}
            summary.not_run = sum(c.spec.key not in done for c in todo)
        _end_parent(tracker, parent_id, summary, status, evaluator, background)
    return summary


class _Sweep:
    """The units of one invocation through an executor (a round; the wait for other runners'
    cells may add more), their results streamed to the console."""

    def __init__(self, exp: Experiment, tracker: tracking.Tracker, parent_id: str, jobs: int, gpus: int,
                 evaluator: Any, background: tracking.Background, progress: bool, echo: Printer,
                 stop: Callable[[], bool], fail_fast: bool, total: int, ray: RayOptions | None = None):
        self.exp, self.tracker, self.parent_id, self.jobs, self.gpus = exp, tracker, parent_id, jobs, gpus
        self.ray = ray
        self.evaluator, self.background, self.progress, self.echo = evaluator, background, progress, echo
        self.stop, self.fail_fast, self.total = stop, fail_fast, total
        self.results: list[CellResult] = []
        self.stopping = False

    def run(self, units: list[Any]) -> None:
        from tqdm.auto import tqdm

        from vaebench.executors import LocalExecutor, PoolExecutor, RayExecutor

        if not units:
            return
        if self.ray is not None:
            executor: Any = RayExecutor(self.exp, self.tracker, self.parent_id, address=self.ray.address,
                                        gpus=self.ray.gpus, cpus=self.ray.cpus)
        elif self.jobs > 1 and len(units) > 1:
            executor = PoolExecutor(self.exp, self.tracker, self.parent_id, self.jobs,
                                    gpus=self.gpus if self.gpus > 1 else 0, should_stop=self.stop, echo=self.echo)
        else:
            executor = LocalExecutor(self.exp, self.tracker, self.parent_id, self.evaluator, self.background,
                                     progress=self.progress, should_stop=self.stop)
        cells = sum(len(u) for u in units)
        bar = tqdm(total=cells, desc="cells", unit="run", disable=not self.progress)
        try:
            for result in executor.run(units):
                self.keep(result)
                bar.update()
                if self.fail_fast and result.status == "failed" and not result.earlier and not self.stopping:
                    self.stopping = True
                    executor.stop()
                    self.echo("--fail-fast: a cell failed; stopping the sweep (running cells end KILLED, resumable)")
        finally:
            bar.close()

    def keep(self, result: CellResult) -> None:
        self.results.append(result)
        self._show(result)

    def _show(self, result: CellResult) -> None:
        if result.note and result.status != "claimed":
            self.echo(f"{result.spec.name}: {result.note}")
        done = sum(r.status != "claimed" for r in self.results)
        if result.status == "claimed":
            line = f"{result.spec.name}: left out, {result.note}"
        else:
            line = f"[{done}/{self.total}] {result.spec.name}: {result.status} in {result.seconds:.1f}s" + \
                   (f" - {result.error}" if result.error else _headline(result.metrics))
        self.echo(line)


def _cell(spec: RunSpec, resume_run_id: str | None, force_since: int | None, retry_failed: bool) -> Any:
    from vaebench.units import Cell

    return Cell(spec, resume_run_id, force_since, retry_failed)


def _units(cells: list[Any], pack: str | int, device_type: str) -> list[Any]:
    from vaebench.plan import make_units, pack_limit

    return make_units(cells, lambda c: c.spec.settings, pack_limit(pack, device_type))


def _wait_for_others(tracker: tracking.Tracker, waiting: list[CellResult], echo: Printer,
                     stop: Callable[[], bool]) -> list[CellResult]:
    """Wait until some of the cells other runners hold are free again (finished there, or their
    runner stopped and its claim expired); those cells."""
    keys = [r.spec.key for r in waiting]
    held = claims.holders(tracker, keys)
    owners = sorted({str(h) for h in held.values()})
    if held:
        echo(f"waiting for {plural(len(held), 'cell')} that other runners are training ({', '.join(owners)}); "
             f"they are taken over if those runners stop (Ctrl-C stops waiting, nothing is lost)")
    while len(held) == len(keys):  # until one of them is free
        if stop():
            raise KeyboardInterrupt("stop requested")
        time.sleep(min(5.0, claims.ttl() / 6))
        held = claims.holders(tracker, keys)
    return [r for r in waiting if r.spec.key not in held]


def _end_parent(tracker: tracking.Tracker, parent_id: str, summary: Summary, status: str, evaluator: Any,
                background: tracking.Background) -> None:
    """The sweep's parent run ends with its counts; whatever the background thread still owes
    the store is written first (an error there is raised after the parent is ended)."""
    error: BaseException | None = None
    try:
        evaluator.close(cancel=status == "KILLED")
    finally:
        try:
            background.close()
        except Exception as e:  # noqa: BLE001 - raised below, once the parent run has its status
            error = e
    tracking.log_metrics(tracker, parent_id, {
        "cells/trained": len(summary.of("trained", "resumed")),
        "cells/skipped": len(summary.of("skipped")), "cells/failed": len(summary.of("failed"))})
    tracking.finish(tracker, parent_id, status)
    if error is not None:
        raise error


EVAL_WORKERS_MAX = 8


def _check_devices(exp: Experiment, todo: list[Any]) -> None:
    """Every device the cells to train ask for is here, before any of them starts (a bad input:
    exit 2, naming the file and the setting)."""
    from vaebench.train import DeviceUnavailable, resolve_device

    for name in sorted({c.spec.settings.device for c in todo}):
        try:
            resolve_device(name)
        except DeviceUnavailable as e:
            n = sum(c.spec.settings.device == name for c in todo)
            others = " (--only device=auto or device=cpu runs the others)" if n < len(todo) else ""
            raise SelectionError(f"{exp.path}: device: {name!r}, in {plural(n, 'cell')} to train: {e}{others}") \
                from None


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
    from vaebench.attempts import decide
    from vaebench.results import evaluate_and_log
    from vaebench.train import build_for, dataset_for, resolve_device

    if overrides:
        exp = exp.model_copy(update={"evaluate": exp.evaluate.model_validate(
            {**exp.evaluate.model_dump(), **overrides})})
    specs = select(expand(exp), only or {})
    tracker = tracking.connect(exp.resolved_tracking_uri(), exp.name, echo)
    existing = tracking.runs_by_key(tracker)
    results: list[CellResult] = []
    for i, spec in enumerate(specs):
        prefix = f"[{i + 1}/{len(specs)}] {spec.name}"
        run = next((r for r in existing.get(spec.key, []) if r.info.status == "FINISHED"), None)
        if run is None:
            results.append(CellResult(spec, "missing"))
            decision = decide(existing.get(spec.key, []))  # what `vaebench run` would do with it
            how = (f"{decision.reason.split('; ')[0]}; `vaebench run --retry-failed` trains it afresh"
                   if decision.action == "give_up" else "train it with `vaebench run`")
            echo(f"{prefix}: no finished run to evaluate ({how})")
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
            data = dataset_for(s, exp.resolved_data_dir(), exp.base_dir)
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
