"""Running trials: `optimize` (the study's trials in this process), the spawned worker processes
of `--jobs N` that share the study through its storage, and cleaning up after processes that died
mid-trial (orphans of this machine at once, other machines' once their heartbeat is stale)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

from vaebench.tune.plan import Plan, open_study
from vaebench.tune.storage import quiet
from vaebench.tune.trial import ATTR_RUN_ID, ATTR_WORKER, TAG_TRIAL_STATE, Objective, stop_if_asked, trial_line

Printer = Callable[[str], None]
WORKER_GRACE = 15.0  # seconds the workers have, after a stop, to record their trials


def optimize(plan: Plan, n_trials: int | None, timeout: float | None, *, worker: int = 0,
             echo: Printer = print, should_stop: Callable[[], bool] | None = None) -> None:
    """Run up to `n_trials` trials (or until `timeout`) of the study in this process.

    `should_stop` is how a signal stops it: polled before every batch and after every trial, it
    raises KeyboardInterrupt at those points. A KeyboardInterrupt raised by the signal handler
    itself can land inside a write to SQLite and leave that connection holding the database's lock:
    recording the trial then waited on that lock for good (about 1 SIGTERM in 10; caught with gdb in
    SQLite's busy handler)."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from vaebench import tracking

    tracker = tracking.connect(plan.tracking_uri, plan.exp.name)
    study = open_study(plan, worker=worker, on_stale=StaleRunCloser(plan.tracking_uri, plan.exp.name))
    callbacks = [lambda study, t: echo(trial_line(plan, t))]
    if should_stop is not None:  # a stop asked for during a trial's evaluation: that trial is kept
        callbacks.append(lambda study, t: stop_if_asked(should_stop))
    if plan.n_trials is not None:  # the study's total, whoever runs the trials (other machines too)
        callbacks.append(MaxTrialsCallback(plan.n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    try:
        quiet(lambda: study.optimize(Objective(plan, tracker, worker, should_stop), n_trials=n_trials, timeout=timeout,
                                     catch=(Exception,), callbacks=callbacks, gc_after_trial=True))
    except KeyboardInterrupt:
        stop_stray_heartbeats()
        raise


def stop_stray_heartbeats() -> int:
    """Stop Optuna heartbeat threads that nobody will stop; how many there were.

    Optuna starts a trial's heartbeat thread (not a daemon) and stops it when the `with` around the
    objective ends. A Ctrl-C that lands between the thread's start and that `with` (about 1 in 20
    interrupts between trials) skips the stop: the thread beats forever and the interpreter, which
    waits for non-daemon threads, never exits. Recognised by its target; an Optuna that names it
    otherwise is simply not matched."""
    import threading

    try:
        from optuna.storages._heartbeat import HeartbeatThread
    except ImportError:
        return 0
    stopped = 0
    for thread in threading.enumerate():
        args = getattr(thread, "_args", ())
        if getattr(thread, "_target", None) is HeartbeatThread._record_heartbeat and len(args) == 3:
            args[2].set()  # its stop event
            stopped += 1
    return stopped


class StaleRunCloser:
    """Heartbeat callback: when Optuna fails a trial whose process stopped beating, end its
    MLflow run too (FAILED, tagged) instead of leaving it RUNNING forever."""

    def __init__(self, tracking_uri: str, experiment: str):
        self.tracking_uri, self.experiment = tracking_uri, experiment

    def __call__(self, study: Any, trial: Any) -> None:
        _close_orphan_run(self.tracking_uri, self.experiment, trial, "its worker stopped sending heartbeats")


def _close_orphan_run(tracking_uri: str, experiment: str, trial: Any, why: str) -> None:
    from vaebench import tracking

    run_id = trial.user_attrs.get(ATTR_RUN_ID)
    if not run_id:
        return
    tracker = tracking.connect(tracking_uri, experiment)
    tracking.set_tags(tracker, run_id, {TAG_TRIAL_STATE: "FAIL", tracking.TAG_ERROR: why})
    tracking.finish(tracker, run_id, "FAILED")


def fail_orphans(study: Any, plan: Plan, echo: Printer) -> list[int]:
    """Trials left RUNNING by a process of this machine that no longer exists (killed, crashed):
    mark them FAIL now, rather than waiting for their heartbeat to go stale. Trials of other
    machines are left to the heartbeat."""
    from optuna.trial import TrialState

    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, _, pid = str(t.user_attrs.get(ATTR_WORKER, "")).rpartition(":")
        if host != platform.node() or _alive(pid):
            continue
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        _close_orphan_run(plan.tracking_uri, plan.exp.name, t, "its process ended without finishing it")
        failed.append(t.number)
        echo(f"trial {t.number}: its process ({pid}) is gone; marked FAIL")
    return failed


def _alive(pid: Any) -> bool:
    try:
        pid = int(pid)
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OSError):
        return True  # someone else's process, or no pid recorded: assume alive
    try:  # a zombie (killed, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _worker(plan: Plan, n_trials: int | None, timeout: float | None, worker: int, threads: int,
            queue: Any) -> None:
    """Entry point of a spawned worker process."""
    import signal
    import sys
    import threading

    import optuna
    import torch

    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # SIGTERM (to the group, or from the main process) as Ctrl-C: the trial stops at its next batch
    # and is recorded. The first of the two is taken; a second must not break off the recording.
    stop = threading.Event()

    def interrupt(signum: int, frame: Any) -> None:
        # The second signal is taken and dropped by a handler of our own, not SIG_IGN: a signal that
        # already arrived (Ctrl-C reaches the whole group, then the main process sends SIGTERM) and
        # is only run now would find SIG_IGN and print "OSError: Signal 15 ignored due to race
        # condition" with a traceback.
        signal.signal(signal.SIGTERM, _ignore)
        signal.signal(signal.SIGINT, _ignore)
        stop.set()

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    try:
        optimize(plan, n_trials, timeout, worker=worker, echo=lambda line: queue.put(f"[worker {worker}] {line}"),
                 should_stop=stop.is_set)
    except KeyboardInterrupt:
        sys.exit(130)


def _ignore(signum: int, frame: Any) -> None:
    pass


def run_workers(plan: Plan, remaining: int | None, timeout: float | None, n_jobs: int,
                echo: Printer, should_stop: Callable[[], bool] | None = None) -> list[int]:
    """N spawned processes share the study through its storage; each runs its share of the
    remaining trials. Returns the workers' exit codes. `should_stop` (polled while waiting for
    them) stops them as a Ctrl-C does, from a point where this process writes to no store."""
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    lines = ctx.Queue()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // n_jobs)
    shares = [None] * n_jobs if remaining is None else \
        [remaining // n_jobs + (1 if i < remaining % n_jobs else 0) for i in range(n_jobs)]
    procs = [ctx.Process(target=_worker, args=(plan, share, timeout, i, threads, lines),
                         name=f"vaebench-tune-{i}", daemon=False)
             for i, share in enumerate(shares) if share != 0]
    echo(f"{len(procs)} worker processes, {threads} torch thread(s) each")
    for p in procs:
        p.start()

    def drain(block: bool) -> None:
        while True:
            try:
                echo(lines.get(timeout=0.2) if block else lines.get_nowait())
            except queue_mod.Empty:
                return

    try:
        while any(p.is_alive() for p in procs):
            stop_if_asked(should_stop)
            drain(block=True)
    except KeyboardInterrupt:
        # A Ctrl-C in a terminal reached them too; a SIGTERM or SIGINT sent to this process alone
        # did not: tell each (a second signal is ignored), then give them time to record their trials.
        for p in procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + WORKER_GRACE
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
        raise
    finally:
        for p in procs:
            p.join()
        drain(block=False)
    return [p.exitcode for p in procs]


def _ray_worker(plan: Plan, n_trials: int | None, timeout: float | None, worker: int, threads: int,
                lines: Any) -> int:
    """An Optuna worker as a Ray task: the same loop as a local worker process; its lines go
    to the driver through a Ray queue. Returns its exit code."""
    import optuna
    import torch

    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        optimize(plan, n_trials, timeout, worker=worker, echo=lambda line: lines.put(f"[worker {worker}] {line}"))
    except KeyboardInterrupt:
        return 130
    return 0


def run_ray_workers(plan: Plan, remaining: int | None, timeout: float | None, n_jobs: int, echo: Printer,
                    address: str | None) -> list[int]:
    """`n_jobs` Optuna workers as tasks on a Ray cluster (vaebench.cluster), sharing the study
    through its RDB storage exactly as local worker processes do: Optuna's samplers, pruners,
    multi-objective studies and resume work unchanged. Returns the workers' exit codes."""
    import queue as queue_mod

    from ray.util.queue import Queue

    from vaebench import cluster

    ray = cluster.connect(address)
    lines = Queue()
    gpus = 1.0 if cluster.gpus(ray) else 0.0
    task = ray.remote(_ray_worker).options(num_cpus=1, num_gpus=gpus, max_retries=0)
    shares = [None] * n_jobs if remaining is None else \
        [remaining // n_jobs + (1 if i < remaining % n_jobs else 0) for i in range(n_jobs)]
    refs = [task.remote(plan, share, timeout, i, 1, lines) for i, share in enumerate(shares) if share != 0]
    echo(f"{len(refs)} workers as Ray tasks")

    def drain() -> None:
        while True:
            try:
                echo(lines.get_nowait())
            except (queue_mod.Empty, Exception):  # noqa: BLE001 - ray.util.queue.Empty
                return

    pending, codes = list(refs), []
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=0.2)
            drain()
            codes += [ray.get(ref) for ref in done]
    except KeyboardInterrupt:
        cluster.cancel(ray, pending)
        raise
    finally:
        drain()
    return codes
