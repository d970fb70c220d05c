"""Executors: where the units of work run. One interface, `run(units) -> Iterator[CellResult]`:
units go in, results stream back as cells finish, whatever runs them.

- `LocalExecutor`: one unit after another in this process, which owns the device; trained cells go
  to its evaluator (results.Evaluator, or results.PoolEvaluator off the critical path).
- `PoolExecutor`: `jobs` worker processes, spawned once and reused for every unit: on a CPU
  machine each gets its share of the threads; with several GPUs each gets its own
  (CUDA_VISIBLE_DEVICES). A worker trains and evaluates its units in place.

- `RayExecutor`: every unit a Ray task on a cluster (vaebench.cluster), with declared resources;
  the task trains and evaluates its unit in place on whichever node Ray picks.

All record every run in the tracking store the same way (vaebench.units: `run_unit` wherever it
runs, claims included, then the unit's results sent back). `stop()` asks an executor to start no
further unit and to stop the running ones at their next batch (their runs end KILLED, resumable):
what `--fail-fast` uses.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Iterable, Iterator

from vaebench import tracking
from vaebench.config import Experiment
from vaebench.plan import Unit
from vaebench.lifetime import exit_after_grace, exit_with_parent
from vaebench.results import CellResult, Evaluator
from vaebench.units import run_unit


class LocalExecutor:
    def __init__(self, exp: Experiment, tracker: tracking.Tracker, parent_id: str, evaluator: Evaluator,
                 background: tracking.Background, *, progress: bool = True,
                 should_stop: Callable[[], bool] | None = None):
        self.exp, self.tracker, self.parent_id = exp, tracker, parent_id
        self.evaluator, self.background = evaluator, background
        self.progress, self.should_stop = progress, should_stop
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def _stopping(self) -> bool:
        return self._stop.is_set() or (self.should_stop is not None and self.should_stop())

    def run(self, units: Iterable[Unit]) -> Iterator[CellResult]:
        for unit in units:
            if self._stopping():
                raise KeyboardInterrupt("stop requested")
            yield from self.evaluator.ready()
            yield from run_unit(self.exp, unit, self.tracker, self.parent_id, self.evaluator, self.background,
                                progress=self.progress, should_stop=self._stopping)
            yield from self.evaluator.ready()
        yield from self.evaluator.drain()


class PoolExecutor:
    """A worker that dies (killed, out of memory) breaks the pool: CPython then stops the other
    workers too (SIGTERM: they end their units' runs KILLED, resumable). The units that had not
    come back go to a new pool, at most POOL_RESTARTS times a sweep; their cells are taken over
    from the dead worker (its claims die with its process) and resume from their checkpoints."""

    POOL_RESTARTS = 3

    def __init__(self, exp: Experiment, tracker: tracking.Tracker, parent_id: str, jobs: int, *, gpus: int = 0,
                 should_stop: Callable[[], bool] | None = None, echo: Callable[[str], None] = print):
        self.exp, self.tracker, self.parent_id, self.jobs, self.gpus = exp, tracker, parent_id, jobs, gpus
        self.should_stop = should_stop  # polled while the workers train: a stop asked of this process reaches them
        self.echo = echo
        self._stop: Any = None  # a multiprocessing Event the workers share
        self._stopped = False

    def stop(self) -> None:
        self._stopped = True
        if self._stop is not None:
            self._stop.set()

    def run(self, units: Iterable[Unit]) -> Iterator[CellResult]:
        from concurrent.futures import BrokenExecutor

        left = list(units)
        for restart in range(self.POOL_RESTARTS + 1):
            try:
                yield from self._round(left)
                return
            except BrokenExecutor:
                if self._stopped or restart == self.POOL_RESTARTS or \
                        (self.should_stop is not None and self.should_stop()):
                    raise
                self.echo(f"warning: a worker process died (killed, or out of memory); "
                          f"{len(left)} unit(s) go to new worker processes")

    def _round(self, left: list[Unit]) -> Iterator[CellResult]:
        """The units of `left` in one pool; each leaves the list once its results are out."""
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, BrokenExecutor, ProcessPoolExecutor, wait

        ctx = multiprocessing.get_context("spawn")
        gpu_ids = ctx.Queue()
        for i in range(self.jobs):
            gpu_ids.put(i % self.gpus if self.gpus else None)
        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        self._stop = ctx.Event()  # a new one: the broken pool's workers set theirs as they were stopped
        if self._stopped:
            self._stop.set()
        with ProcessPoolExecutor(max_workers=min(self.jobs, len(left)), mp_context=ctx,
                                 initializer=_init_worker, initargs=(threads, gpu_ids, self._stop)) as pool:
            futures = {pool.submit(_unit_in_worker, self.exp, unit, self.tracker.uri, self.parent_id): unit
                       for unit in left}
            pending = set(futures)
            # raised once every unit is back: the results of the units that did come back count
            broken: BaseException | None = None  # a worker died
            stopped: BaseException | None = None  # a unit that was not started: the sweep is stopping
            try:
                while pending:
                    done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    if self.should_stop is not None and self.should_stop():  # SIGTERM to this process only
                        self._stop.set()
                    for future in done:
                        try:
                            results = future.result()
                        except BrokenExecutor as e:
                            broken = e
                            continue
                        except KeyboardInterrupt as e:
                            stopped = e
                            continue
                        left.remove(futures[future])
                        yield from results
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            if stopped is not None:
                raise stopped
            if broken is not None:
                raise broken


class RayExecutor:
    """Units as Ray tasks: `gpus` (fractional: small units share a GPU; default one per unit when
    the cluster has GPUs, else none) and `cpus` each. A task whose worker died is retried on
    another node (cluster.TASK_RETRIES); its cells are taken over once the dead worker's claims
    expire (vaebench.claims) and continue from their checkpoints."""

    def __init__(self, exp: Experiment, tracker: tracking.Tracker, parent_id: str, *, address: str | None = None,
                 gpus: float | None = None, cpus: float = 1.0):
        self.exp, self.tracker, self.parent_id = exp, tracker, parent_id
        self.address, self.gpus, self.cpus = address, gpus, cpus
        self._refs: list[Any] = []
        self._ray: Any = None

    def stop(self) -> None:
        if self._ray is not None:
            from vaebench import cluster

            cluster.cancel(self._ray, self._refs)

    def run(self, units: Iterable[Unit]) -> Iterator[CellResult]:
        from vaebench import cluster

        ray = self._ray = cluster.connect(self.address)
        gpus = self.gpus if self.gpus is not None else (1.0 if cluster.gpus(ray) else 0.0)
        task = ray.remote(_unit_in_ray).options(num_cpus=self.cpus, num_gpus=gpus, max_retries=cluster.TASK_RETRIES)
        threads = max(1, int(self.cpus))
        self._refs = [task.remote(self.exp, unit, self.tracker.uri, self.parent_id, threads) for unit in units]
        try:
            for results in cluster.results(ray, self._refs):
                yield from results
        except BaseException:
            cluster.cancel(ray, self._refs)
            raise


_WORKER: dict[str, Any] = {}  # per worker process: its stop flag and tracker, reused across units


def _init_worker(threads: int, gpu_ids: Any, stop: Any) -> None:
    import signal

    gpu = gpu_ids.get()
    if gpu is not None:  # before anything initialises CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    import torch

    torch.set_num_threads(threads)
    # Ctrl-C reaches the whole process group (and a scheduler's SIGTERM often does): workers stop
    # at their next batch, cleanly. The event is shared with the parent, which sets it for --fail-fast
    # and when it is asked to stop itself.
    _WORKER["stop"] = stop
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda signum, _: (stop.set(), exit_after_grace(signum)))
    exit_with_parent()


def _unit_in_worker(exp: Experiment, unit: Unit, uri: str, parent_id: str) -> list[CellResult]:
    stop = _WORKER["stop"]
    if stop.is_set():
        raise KeyboardInterrupt("stop requested")
    return _run_here(exp, unit, uri, parent_id, stop.is_set)


def _unit_in_ray(exp: Experiment, unit: Unit, uri: str, parent_id: str, threads: int) -> list[CellResult]:
    import torch

    torch.set_num_threads(threads)
    return _run_here(exp, unit, uri, parent_id, None)


def _run_here(exp: Experiment, unit: Unit, uri: str, parent_id: str,
              should_stop: Callable[[], bool] | None) -> list[CellResult]:
    """A unit trained and evaluated in this (worker) process; its tracker is kept for the next."""
    key = f"tracker|{uri}|{exp.name}"
    if key not in _WORKER:
        _WORKER[key] = tracking.connect(uri, exp.name)
    tracker = _WORKER[key]
    background = tracking.Background()
    evaluator = Evaluator(exp, tracker, background)
    try:
        results = run_unit(exp, unit, tracker, parent_id, evaluator, background, progress=False,
                           should_stop=should_stop)
        return results + evaluator.drain()
    finally:
        background.close()
