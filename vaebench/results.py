"""What happens to a trained model: its final artifacts, the evaluation protocol, and the end of its
MLflow run.

Two ways to get there, with the same outcome in MLflow:

- `log_trained` does it all at once, in the calling process (Optuna trials, `--jobs` workers).
- an `Evaluator` splits it so that the device never waits for the CPU: `prepare` runs the part of
  the protocol that needs the model on the device (encodings, ELBO, the IWAE estimate) in the
  trainer's process right after training; `complete` (clustering scores, figures, the uploads)
  runs in a pool of worker processes while the device trains the next unit (`PoolEvaluator`; the
  trainer calls `poll` between epochs, which ends the runs whose evaluation is done), or right
  away (`Evaluator`, the default on the CPU, where there are no idle cores to use).

The dataset's raw-pixel baseline is computed once per dataset, preprocessing and protocol before
any cell is evaluated (in the pool when there is one), never inside a cell's time.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from vaebench import claims, tracking
from vaebench.config import EvaluateSettings, Experiment, RunSettings
from vaebench.lifetime import exit_after_grace, exit_with_parent

if TYPE_CHECKING:  # annotations only: this module imports torch lazily
    from vaebench.data import Dataset
    from vaebench.evaluate import Evaluation
    from vaebench.matrix import RunSpec
    from vaebench.models import AutoEncoder
    from vaebench.train import TrainResult


@dataclass
class CellResult:
    spec: RunSpec
    # trained | resumed | skipped | failed | claimed (another runner has it); re-evaluation: evaluated | missing
    status: str
    run_id: str | None = None
    seconds: float = 0.0
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    note: str | None = None  # something the user should know (a damaged checkpoint, who has the cell)
    earlier: bool = False  # failed: in an earlier invocation, and not retried in this one (vaebench.attempts)
    fix: str | None = None  # failed: what the error says to do about it, past its first line (missing data)


# --- all at once ---------------------------------------------------------------------------------


def log_trained(exp: Experiment, s: RunSettings, data: Dataset, result: TrainResult,
                tracker: tracking.Tracker, run_id: str) -> dict[str, float]:
    """After training: log the final model, run the evaluation protocol, log the final metrics;
    returns them (matrix cells and Optuna trials alike)."""
    job = prepare(exp, s, result, data, run_id, score=True)
    return complete(job, tracker, model=result.model, data=data)


def evaluate_and_log(exp: Experiment, s: RunSettings, model: AutoEncoder, data: Dataset,
                     history: list[dict[str, float]], tracker: tracking.Tracker, run_id: str,
                     step: int) -> dict[str, float]:
    """Run the evaluation protocol on a trained model and log its test/* metrics, the dataset's
    raw-pixel baseline, the per-dim KL table and the figures to `run_id` (re-evaluation)."""
    evaluation = _measure(exp, s, model, data, score=True)
    job = Job(exp, s, run_id, step, evaluation, {}, tuple(model.in_shape), history, log_model=False)
    return complete(job, tracker, model=model, data=data)


# --- in two parts ---------------------------------------------------------------------------------


@dataclass
class Job:
    """The CPU side of one cell's evaluation: everything it needs, picklable."""

    exp: Experiment
    settings: RunSettings
    run_id: str
    step: int  # the step its final metrics are logged at (epochs run)
    evaluation: Evaluation  # the device part's metrics, and the codes still to score (if any)
    state_dict: dict[str, Any]  # the final weights, on the CPU
    in_shape: tuple[int, int, int]
    history: list[dict[str, float]]
    final: dict[str, float] = field(default_factory=dict)  # train/seconds, epochs_run, best_epoch
    tags: dict[str, Any] = field(default_factory=dict)
    log_model: bool = True
    baseline: dict[str, float] | None = None  # filled in before the job runs (when clustering)


def prepare(exp: Experiment, s: RunSettings, result: TrainResult, data: Dataset, run_id: str, *,
            score: bool = False) -> Job:
    """The device part, in the trainer's process: the protocol up to the codes (scored too with
    `score`, for an all-at-once caller)."""
    from vaebench.train import float32_math

    model = result.model
    t0 = time.perf_counter()
    evaluation = _measure(exp, s, model, data, score=score)
    final = {"train/seconds": result.train_seconds, "train/epochs_run": result.epochs_run,
             "train/best_epoch": result.best_epoch, "eval/device_seconds": time.perf_counter() - t0}
    tags = {"vaebench.stopped_early": result.stopped_early, "vaebench.device": str(result.device),
            "vaebench.float32": float32_math(result.device), **result.how}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return Job(exp, s, run_id, result.epochs_run, evaluation, state, tuple(model.in_shape), result.history,
               final, tags)


def complete(job: Job, tracker: tracking.Tracker, *, model: AutoEncoder | None = None,
             data: Dataset | None = None) -> dict[str, float]:
    """The CPU part: clustering scores, the model and figures as artifacts, the final metrics. With
    no `model`/`data` (a worker process) they are rebuilt on the CPU from the job. Returns the
    final metrics; the caller ends the run."""
    from vaebench.evaluate import score_codes
    from vaebench.losses import effective_beta

    t0 = time.perf_counter()
    s, ev, run_id = job.settings, job.evaluation, job.run_id
    if job.tags:
        tracking.set_tags(tracker, run_id, job.tags)
    if job.log_model:
        tracking.log_torch(tracker, run_id, tracking.MODEL_PATH, {
            "state_dict": job.state_dict, "settings": s.model_dump(mode="json"), "in_shape": list(job.in_shape)})
    metrics = dict(ev.metrics)
    if ev.codes is not None:
        metrics.update(score_codes(ev.codes, job.exp.evaluate))
    c, h, w = job.in_shape
    final = {f"test/{k}": v for k, v in metrics.items()}
    final["effective_beta"] = effective_beta(s.beta, s.reduction, c * h * w)
    if job.exp.evaluate.clustering and "kmeans_acc" not in ev.not_applicable:
        baseline = job.baseline if job.baseline is not None else baseline_for(job.exp, s, data)
        final.update({f"baseline/{k}": v for k, v in baseline.items()})
    if ev.not_applicable:
        tracking.set_tags(tracker, run_id, {tracking.TAG_NOT_APPLICABLE: ",".join(f"test/{k}" for k in ev.not_applicable)})
    if ev.kl_per_dim:
        rows = "dim,kl\n" + "".join(f"{i},{v:.6g}\n" for i, v in enumerate(ev.kl_per_dim))
        tracking.log_text(tracker, run_id, "eval/kl_per_dim.csv", rows)
    if job.exp.evaluate.figures:
        _log_figures(job, tracker, model, data)
    # the metrics last: an evaluation that fails before them (a full disk under the figures) and is
    # retried logs each of them once
    cpu = {"eval/cpu_seconds": time.perf_counter() - t0}  # clustering, figures and uploads
    tracking.log_metrics(tracker, run_id, {**job.final, **final, **cpu}, step=job.step)
    _check_finite(final, s)  # after the log: what was measured stays on the run
    return {**job.final, **final, **cpu}


# the protocol's headline metrics: a model for which one is NaN or infinite has diverged, even when
# its training loss stayed finite (an lr that drives it to 1e28 overflows on the test set)
HEADLINE = ("test/elbo", "test/nll_iw", "test/recon_mse")


def _check_finite(final: dict[str, float], s: RunSettings) -> None:
    import math

    from vaebench.train import TrainingDiverged

    bad = [f"{k} is {final[k]}" for k in HEADLINE if k in final and not math.isfinite(final[k])]
    if bad:
        raise TrainingDiverged(f"{' and '.join(bad)}: the trained model overflows on the test set (it "
                               f"diverged in training); try a smaller lr than {s.lr}")


def _measure(exp: Experiment, s: RunSettings, model: AutoEncoder, data: Dataset, *, score: bool) -> Evaluation:
    from vaebench.batches import to_device
    from vaebench.evaluate import evaluate

    device = next(model.parameters()).device
    opts = dict(image_size=s.image_size, binarization=s.binarization)
    test = to_device(data.test, device, **opts)
    # the training split is only needed to fit the kNN / probe, and only its first
    # probe_train_samples images (static binarization draws image by image: the same values as the
    # whole split's first images, at a fraction of the cost, MNIST 0.22 -> 0.04 s a cell)
    train = (to_device(data.train, device, limit=exp.evaluate.probe_train_samples, **opts)
             if exp.evaluate.clustering else None)
    return evaluate(model, test, s, exp.evaluate, train=train, num_classes=data.num_classes, score=score)


def _log_figures(job: Job, tracker: tracking.Tracker, model: AutoEncoder | None, data: Dataset | None) -> None:
    from vaebench.batches import to_device
    from vaebench.figures import draw_run_figures

    s = job.settings
    if model is None:
        from vaebench.train import build_for

        model = build_for(s, job.in_shape)
        model.load_state_dict(job.state_dict)
        model.eval()
    data = data if data is not None else _dataset(job.exp, s)
    test = to_device(data.test, next(model.parameters()).device, image_size=s.image_size, binarization=s.binarization)
    with tempfile.TemporaryDirectory() as tmp:
        draw_run_figures(model, test, job.history, tmp, likelihood=s.likelihood,
                         projection=job.exp.evaluate.latent_projection)
        tracker.client.log_artifacts(job.run_id, tmp, "figures")


def _dataset(exp: Experiment, s: RunSettings) -> Dataset:
    from vaebench.train import dataset_for

    return dataset_for(s, exp.resolved_data_dir(), exp.base_dir)


# --- the raw-pixel baseline ------------------------------------------------------------------------


def baseline_key(s: RunSettings, protocol: EvaluateSettings) -> str:
    what = {"dataset": s.dataset, "options": s.data_config, "image_size": s.image_size,
            # a dynamic run is measured on the static draw (vaebench.batches): the same pixels
            "binarization": "static" if s.binarization == "dynamic" else s.binarization,
            "protocol": protocol.model_dump(include={"max_test_samples", "probe_train_samples",
                                                     "silhouette_samples", "knn_neighbors", "kmeans_restarts"})}
    if s.val_fraction != RunSettings.model_fields["val_fraction"].default:  # the probes fit on the train split
        what["val_fraction"] = s.val_fraction  # (only when set: the cached baselines keep their names)
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def baseline_for(exp: Experiment, s: RunSettings, data: Dataset | None = None) -> dict[str, float]:
    """The dataset's raw-pixel clustering scores under this cell's preprocessing (cached in memory
    and in data_dir/.vaebench-cache: computed once)."""
    import torch

    from vaebench.batches import to_device
    from vaebench.data import USER_DATASETS
    from vaebench.evaluate import pixel_baseline

    data = data if data is not None else _dataset(exp, s)
    cpu = torch.device("cpu")
    opts = dict(image_size=s.image_size, binarization=s.binarization)
    key = baseline_key(s, exp.evaluate)
    if s.dataset in USER_DATASETS:  # the same options may name other images later
        key += "-" + _content_digest(data)
    return pixel_baseline(to_device(data.train, cpu, **opts), to_device(data.test, cpu, **opts), data.num_classes,
                          exp.evaluate, key, cache_dir=exp.resolved_data_dir() / ".vaebench-cache")


def _content_digest(data: Dataset) -> str:
    """12 hex digits of a sha256 over the dataset's images and labels (train and test splits)."""
    h = hashlib.sha256()
    for t in (data.train.x, data.train.y, data.test.x, data.test.y):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def _fix(error: BaseException) -> str | None:
    """The lines after the first of an error written for the user to act on (a dataset's expected
    files and how to supply them); other errors' further lines are SQL, URLs, internals."""
    from vaebench.data import DatasetUnavailable

    if not isinstance(error, DatasetUnavailable):
        return None
    rest = [line.strip() for line in str(error).strip().splitlines()[1:] if line.strip()]
    return "\n".join(rest) or None


# --- evaluators ------------------------------------------------------------------------------------


class Evaluator:
    """Finishes trained cells in this process, right away: prepare + complete, then the run ends.

    Every cell that leaves a unit, trained or failed, ends here: `finished` and `failed` write the
    run's final status (through the unit's tracking.Background, after its other calls) and then
    release the cell's claim (vaebench.claims); their CellResults come out of `ready()`/`drain()`."""

    def __init__(self, exp: Experiment, tracker: tracking.Tracker, background: tracking.Background):
        self.exp, self.tracker, self.background = exp, tracker, background
        self._done: list[CellResult] = []
        self.failures = 0  # cells failed through this evaluator (what --fail-fast watches)

    def baselines(self, settings: list[RunSettings]) -> None:
        """Compute the baselines these cells need, before any of them is evaluated."""
        if not self.exp.evaluate.clustering:
            return
        for s in {baseline_key(s, self.exp.evaluate): s for s in settings}.values():
            try:
                baseline_for(self.exp, s)
            except Exception:  # noqa: BLE001 - its cells fail on their own, with the reason (missing data...)
                pass

    def submit(self, spec: RunSpec, run_id: str, result: TrainResult, data: Dataset, status: str,
               started: float, note: str | None = None) -> None:
        try:
            job = prepare(self.exp, spec.settings, result, data, run_id)
        except Exception as e:  # noqa: BLE001 - one bad cell must not stop the others
            self.failed(spec, run_id, e, started, note)
            return
        self._complete(job, spec, status, started, note, model=result.model, data=data)

    def _complete(self, job: Job, spec: RunSpec, status: str, started: float, note: str | None, **kw: Any) -> None:
        try:
            metrics = complete(job, self.tracker, **kw)
        except Exception as e:  # noqa: BLE001
            self.failed(spec, job.run_id, e, started, note)
            return
        self.finished(spec, job.run_id, status, started, metrics, note)

    def finished(self, spec: RunSpec, run_id: str, status: str, started: float, metrics: dict[str, float],
                 note: str | None = None) -> CellResult:
        # a checkpoint or metrics that the store did not take make the run incomplete: it fails
        error = self.background.settle(run_id)
        if error is not None:
            return self.failed(spec, run_id, error, started, note)
        self.background.submit(tracking.finish, self.tracker, run_id, "FINISHED")
        self.background.submit(claims.release, self.tracker, spec.key)
        result = CellResult(spec, status, run_id, time.perf_counter() - started, metrics=metrics, note=note)
        self._done.append(result)
        return result

    def failed(self, spec: RunSpec, run_id: str | None, error: BaseException, started: float,
               note: str | None = None) -> CellResult:
        """The cell failed: its run ends FAILED with the reason (tags `vaebench.error`, `vaebench.failure`,
        and for a divergence `vaebench.diverged_at_epoch`), and its claim goes."""
        from vaebench.attempts import DIVERGED, failure_kind

        message = f"{type(error).__name__}: {tracking.first_line(error)}"
        self.failures += 1
        if run_id is not None:
            kind = failure_kind(error)
            tags = {tracking.TAG_ERROR: message, tracking.TAG_FAILURE: kind,
                    "vaebench.traceback": "".join(traceback.format_exception(error))[-4000:]}
            if kind == DIVERGED and getattr(error, "epoch", None) is not None:
                tags["vaebench.diverged_at_epoch"] = error.epoch
            self.background.submit(tracking.mark_failed, self.tracker, run_id, tags)
        self.background.submit(claims.release, self.tracker, spec.key)
        result = CellResult(spec, "failed", run_id, time.perf_counter() - started, error=message, note=note,
                            fix=_fix(error))
        self._done.append(result)
        return result

    def ready(self) -> list[CellResult]:
        """The cells finished since the last call."""
        done, self._done = self._done, []
        return done

    def poll(self) -> None:
        """Between epochs, in the trainer's thread: move finished evaluations along (here every
        cell is finished in `submit`: nothing to do)."""

    def drain(self) -> list[CellResult]:
        """Wait for every submitted cell; the cells finished since the last call."""
        return self.ready()

    def interrupt(self) -> list[CellResult]:
        """The sweep is stopping: the cells whose evaluation ended (here: every submitted one)."""
        return self.ready()

    def pending_runs(self) -> list[str]:
        """Runs whose evaluation was submitted but has not ended (to mark KILLED on an interrupt)."""
        return []

    def pending_keys(self) -> list[str]:
        """Their cells' run keys (their claims go after the KILLED mark)."""
        return []

    def close(self, cancel: bool = False) -> None:
        pass


class PoolEvaluator(Evaluator):
    """The CPU part of each evaluation in `workers` worker processes (spawned, started once, one
    thread each), at most `queue` jobs waiting so the trainer cannot run away from them.

    The device part stays in the trainer's thread, between units. Running it beside the next
    unit's training (its own thread and CUDA stream) was tried and measured on an H100: the two
    contend for the GPU (the packs' epochs 16-37% slower, each evaluation about twice as long) and
    the study took as long (benchmarks/results/h100-bench_gpu-overlap-timeline.log).

    A worker that dies (killed, out of memory) breaks the whole pool: its jobs and the other
    workers' fail with BrokenProcessPool. The pool is then started anew and those jobs go to it
    again, each at most JOB_RETRIES more times; a job that still meets a dead pool fails its cell
    as an environment failure (vaebench.attempts), which the next run resumes and evaluates."""

    JOB_RETRIES = 2

    def __init__(self, exp: Experiment, tracker: tracking.Tracker, background: tracking.Background,
                 workers: int, queue: int | None = None, echo: Callable[[str], None] = print):
        super().__init__(exp, tracker, background)
        self.workers, self.echo = workers, echo
        self.pool = self._new_pool()
        self.limit = queue or 4 * workers
        self._baselines: dict[str, Any] = {}  # baseline key -> future
        self._baseline_settings: dict[str, RunSettings] = {}  # to start one again in a new pool
        self._waiting: list[tuple[Job, RunSpec, str, float, str | None]] = []  # jobs whose baseline is not ready
        self._running: dict[Any, tuple[Job, RunSpec, str, float, str | None]] = {}
        self._broken: dict[str, int] = {}  # run id (or baseline key) -> the dead pools its job met
        self._stopped = False  # interrupted: nothing more is sent to the pool

    def _new_pool(self) -> Any:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_eval_worker, initargs=(self.tracker.uri, self.exp.name))
        # Every worker starts now, while the first unit trains, rather than at its first job: the
        # pool starts a worker per job only when none is idle, and a new worker spends seconds
        # importing and opening its tracker (one at a time on SQLite). Measured on an H100 (conv
        # packs of 8): the first pack's CPU parts began 7-28 s after their jobs were sent.
        for _ in range(self.workers):
            pool.submit(int)
        return pool

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        """pool.submit, in a new pool when a worker's death broke this one."""
        from concurrent.futures import BrokenExecutor

        try:
            return self.pool.submit(fn, *args)
        except BrokenExecutor:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new_pool()
            self.echo("warning: an evaluation worker process died (killed, or out of memory); "
                      "its evaluations start again in a new pool")
            return self.pool.submit(fn, *args)

    def _met_a_dead_pool(self, key: str) -> bool:
        """Count one more dead pool for this job; True while it may be tried again."""
        self._broken[key] = self._broken.get(key, 0) + 1
        return self._broken[key] <= self.JOB_RETRIES

    def baselines(self, settings: list[RunSettings]) -> None:
        """Start the baselines in the pool: they run while the first unit trains."""
        if not self.exp.evaluate.clustering:
            return
        for key, s in {baseline_key(s, self.exp.evaluate): s for s in settings}.items():
            self._baseline_settings[key] = s
            self._baselines[key] = self._submit(_baseline_in_worker, self.exp, s)

    def submit(self, spec: RunSpec, run_id: str, result: TrainResult, data: Dataset, status: str,
               started: float, note: str | None = None) -> None:
        try:
            job = prepare(self.exp, spec.settings, result, data, run_id)
        except Exception as e:  # noqa: BLE001
            self.failed(spec, run_id, e, started, note)
            return
        self._waiting.append((job, spec, status, started, note))
        self._dispatch()
        while self._in_flight() > self.limit:  # back-pressure on the trainer
            self._collect(block=True)

    def _in_flight(self) -> int:
        return len(self._running) + len(self._waiting)

    def _baseline_of(self, job: Job) -> tuple[bool, dict[str, float] | None]:
        """(ready, scores) of the baseline a job needs (None: the job computes it itself)."""
        from concurrent.futures import BrokenExecutor

        key = baseline_key(job.settings, self.exp.evaluate)
        future = self._baselines.get(key)
        if future is None:
            return True, None
        if not future.done():
            return False, None
        try:
            return True, future.result()
        except BrokenExecutor:
            if self._met_a_dead_pool(key):
                self._baselines[key] = self._submit(_baseline_in_worker, self.exp, self._baseline_settings[key])
                return False, None
        except Exception:  # noqa: BLE001 - the job computes it itself, and fails there if it must
            pass
        return True, None

    def _dispatch(self) -> None:
        if self._stopped:
            return
        still = []
        for item in self._waiting:
            job = item[0]
            if self.exp.evaluate.clustering:
                ready, job.baseline = self._baseline_of(job)
                if not ready:
                    still.append(item)
                    continue
            self._running[self._submit(_complete_in_worker, job, self.tracker.uri, self.exp.name)] = item
        self._waiting = still

    def _collect(self, block: bool) -> None:
        from concurrent.futures import FIRST_COMPLETED, BrokenExecutor, wait

        self._dispatch()
        pending = list(self._running) + [f for f in self._baselines.values() if not f.done()]
        if not pending:
            return
        done, _ = wait(pending, timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for future in done:
            if future.cancelled():  # an interrupt took it out of the queue: it stays pending (KILLED)
                continue
            item = self._running.pop(future, None)
            if item is None:
                continue  # a baseline: _dispatch picks it up
            job, spec, status, started, note = item
            try:
                metrics = future.result()
            except BrokenExecutor as e:
                if self._met_a_dead_pool(job.run_id) and not self._stopped:
                    self._waiting.append(item)
                else:
                    self.failed(spec, job.run_id, e, started, note)
                continue
            except Exception as e:  # noqa: BLE001
                self.failed(spec, job.run_id, e, started, note)
                continue
            self.finished(spec, job.run_id, status, started, metrics, note)
        self._dispatch()

    def ready(self) -> list[CellResult]:
        self._collect(block=False)
        return super().ready()

    def poll(self) -> None:
        """Send the jobs whose baseline became ready, and end the runs whose evaluation is done, so
        that a cell is FINISHED in MLflow while the next unit trains, not once it has trained. Ending
        a run waits for the tracking thread's queue: only when that is empty (the trainer does not wait)."""
        if self.background.idle():
            self._collect(block=False)
        else:
            self._dispatch()

    def drain(self) -> list[CellResult]:
        while self._in_flight():
            self._collect(block=True)
        return super().ready()

    def interrupt(self) -> list[CellResult]:
        """The sweep is stopping: start nothing more, let the evaluations in hand end (their cells
        finish as usual), and leave the queued ones pending (`pending_runs`: to mark KILLED)."""
        self._stopped = True
        self.pool.shutdown(wait=True, cancel_futures=True)
        while any(f.done() and not f.cancelled() for f in self._running):
            self._collect(block=False)
        return super().ready()

    def pending_runs(self) -> list[str]:
        """Runs whose evaluation was submitted but has not ended (to mark KILLED on an interrupt)."""
        return [item[0].run_id for item in [*self._waiting, *self._running.values()]]

    def pending_keys(self) -> list[str]:
        return [item[1].key for item in [*self._waiting, *self._running.values()]]

    def close(self, cancel: bool = False) -> None:
        # Idle workers only have their interpreters to tear down (about a second with torch, mlflow
        # and scikit-learn loaded): the sweep need not end after them (the interpreter joins them at
        # exit, while the CLI writes the report). Work still in flight is waited for, or cancelled.
        busy = self._in_flight() > 0 or any(not f.done() for f in self._baselines.values())
        self.pool.shutdown(wait=cancel or busy, cancel_futures=cancel)


_WORKER: dict[str, Any] = {}  # per evaluation worker process: its trackers


# what the CPU part of an evaluation imports (clustering, figures), loaded when a worker starts
_CPU_PART_MODULES = ("sklearn.cluster", "sklearn.neighbors", "sklearn.linear_model", "sklearn.metrics",
                     "sklearn.decomposition", "matplotlib.figure", "matplotlib.backends.backend_agg")


def _init_eval_worker(uri: str, experiment: str) -> None:
    import importlib
    import signal

    import torch

    torch.set_num_threads(1)
    # the trainer's process handles Ctrl-C and SIGTERM and shuts the pool down; a SIGTERM here (the
    # whole group got it) lets the evaluation in hand finish, within a grace period
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, _: exit_after_grace(signum))
    exit_with_parent()
    # ready for a first job: an exception here would break the pool, so a failure is left for the
    # job, which meets it again and fails its cell with the reason
    try:
        for name in _CPU_PART_MODULES:
            importlib.import_module(name)
        _tracker(uri, experiment)
    except Exception:  # noqa: BLE001, S110
        pass


def _tracker(uri: str, experiment: str) -> tracking.Tracker:
    key = f"{uri}|{experiment}"
    if key not in _WORKER:
        _WORKER[key] = tracking.connect(uri, experiment)
    return _WORKER[key]


def _complete_in_worker(job: Job, uri: str, experiment: str) -> dict[str, float]:
    return complete(job, _tracker(uri, experiment))


def _baseline_in_worker(exp: Experiment, s: RunSettings) -> dict[str, float]:
    return baseline_for(exp, s)

