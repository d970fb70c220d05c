"""`vaebench tune`: Optuna studies over the same train/evaluate functions as `vaebench run`.

A trial is one run: `defaults` + the study's fixed matrix cell (`tune.cell`) + a point of
`tune.space` -> `train.train` -> `runner.log_trained`, in its own MLflow run (a child of the
study's parent run). Per-epoch validation metrics go to MLflow and, for single-objective studies,
to the pruner; a pruned trial's MLflow run ends KILLED with its curve so far.

The study lives in an Optuna storage (default: `optuna.db` next to the MLflow store), so rerunning
the same command resumes it: `n_trials` is the study's total of finished (complete + pruned)
trials, and only the missing ones run. `--jobs N` starts N spawned worker processes that share the
study through that storage.

Nothing heavy at import time: optuna, torch and mlflow are imported inside the functions.
"""

from __future__ import annotations

import json
import os
import platform
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from vaebench.config import (ConfigError, Experiment, RunSettings, SearchParam, TuneSettings, param_kind,
                             tune_base_settings, tune_fixed_cell)

Printer = Callable[[str], None]

# Registries: name in the YAML -> class in optuna.samplers / optuna.pruners. CmaEsSampler is left
# out on purpose: it needs the separate `cmaes` package, which vaebench does not install.
SAMPLERS: dict[str, str] = {
    "tpe": "TPESampler",        # default; handles single and multi-objective studies
    "random": "RandomSampler",
    "grid": "GridSampler",      # every combination of a categorical-only space
    "gp": "GPSampler",          # Gaussian-process Bayesian optimisation (good for few trials)
    "qmc": "QMCSampler",        # quasi-Monte Carlo (Sobol) space filling
    "nsgaii": "NSGAIISampler",  # genetic, for multi-objective studies
}
PRUNERS: dict[str, str] = {"median": "MedianPruner", "hyperband": "HyperbandPruner", "none": "NopPruner"}
RESERVED_OPTIONS = {"seed": "set it with tune.seed", "search_space": "the grid is tune.space"}

DEFAULT_TRIALS = 20
HEARTBEAT_SECONDS = 30  # RDB storages: a trial whose process stopped beating for 2x this is failed
ATTR_RUN_ID, ATTR_RUN_KEY, ATTR_WORKER = "mlflow_run_id", "run_key", "worker"  # worker: "host:pid"
ATTR_ERROR, ATTR_PRUNED_AT = "error", "pruned_at_epoch"
TAG_TRIAL_STATE, TAG_BEST, TAG_STUDY = "vaebench.trial_state", "vaebench.best", "optuna.study_name"


class MetricUnavailable(RuntimeError):
    """The objective (or pruning) metric was not computed for a trial: every trial would fail the
    same way, so the study stops."""


# --- the search space --------------------------------------------------------------------------


@dataclass(frozen=True)
class Dimension:
    """One searched setting. Categorical choices Optuna cannot store (lists such as
    `arch_options.mlp.hidden: [[64], [128, 128]]`) are given to it as their JSON text."""

    key: str
    kind: str  # float | int | categorical
    param: SearchParam

    @property
    def encoded(self) -> bool:
        return self.kind == "categorical" and any(isinstance(c, (list, dict)) for c in self.param.choices)

    @property
    def optuna_choices(self) -> list[Any]:
        return [json.dumps(c) for c in self.param.choices] if self.encoded else list(self.param.choices)

    def encode(self, value: Any) -> Any:
        return json.dumps(value) if self.encoded else value

    def decode(self, value: Any) -> Any:
        return json.loads(value) if self.encoded and isinstance(value, str) else value

    def suggest(self, trial: Any) -> Any:
        p = self.param
        if self.kind == "categorical":
            return self.decode(trial.suggest_categorical(self.key, self.optuna_choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        return trial.suggest_float(self.key, float(p.low), float(p.high), step=p.step, log=p.log)


def dimensions(exp: Experiment) -> list[Dimension]:
    base = tune_base_settings(exp)
    return [Dimension(k, param_kind(base, k, p), p) for k, p in exp.tune.space.items()]


# --- samplers, pruners, storage ----------------------------------------------------------------


def check_options(what: str, name: str, options: dict[str, Any]) -> list[tuple[str | None, str]]:
    """Problems with `tune.sampler_options` / `tune.pruner_options` (for the config loader):
    unknown or reserved keys, and values the Optuna class rejects."""
    import inspect

    import optuna

    cls = getattr(optuna.samplers if what == "sampler" else optuna.pruners,
                  (SAMPLERS if what == "sampler" else PRUNERS)[name])
    allowed = [p for p in inspect.signature(cls).parameters if p not in RESERVED_OPTIONS]
    out: list[tuple[str | None, str]] = []
    for key in options:
        if key in RESERVED_OPTIONS:
            out.append((key, f"set by vaebench ({RESERVED_OPTIONS[key]})"))
        elif key not in allowed:
            out.append((key, f"unknown {name} option; allowed: {', '.join(allowed) or 'none'}"))
    if not out and name != "grid":
        try:
            _quiet(lambda: cls(**options))
        except (TypeError, ValueError) as e:
            out.append((None, f"{cls.__name__} rejects {options}: {e}"))
    return out


def _quiet(fn: Callable[[], Any]) -> Any:
    import warnings

    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return fn()


def make_sampler(tune: TuneSettings, dims: list[Dimension], seed: int | None) -> Any:
    import optuna

    kwargs = dict(tune.sampler_options)
    if tune.sampler == "grid":
        kwargs["search_space"] = {d.key: d.optuna_choices for d in dims}
    return _quiet(lambda: getattr(optuna.samplers, SAMPLERS[tune.sampler])(seed=seed, **kwargs))


def make_pruner(tune: TuneSettings) -> Any:
    import optuna

    return getattr(optuna.pruners, PRUNERS[tune.pruner_name])(**tune.pruner_options)


def sampler_seed(seed: int | None, n_existing: int, worker: int) -> int | None:
    """The sampler's seed, derived from tune.seed, the trials already in the study and the worker:
    a resumed study (or a second worker) does not replay the same first suggestions."""
    if seed is None:
        return None
    import numpy as np

    return int(np.random.SeedSequence([seed, n_existing, worker]).generate_state(1)[0])


def resolved_storage(exp: Experiment) -> str:
    """`tune.storage` (relative sqlite paths are relative to the experiments file), else
    `optuna.db` next to the MLflow SQLite store (or next to the experiments file)."""
    url = exp.tune.storage
    if url:
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            rel = url[len("sqlite:///"):]
            if rel != ":memory:":
                url = "sqlite:///" + str((exp.base_dir / rel).resolve())
        return url
    uri = exp.resolved_tracking_uri()
    folder = Path(uri[len("sqlite:///"):]).parent if uri.startswith("sqlite:///") and ":memory:" not in uri \
        else exp.base_dir
    return "sqlite:///" + str((folder / "optuna.db").resolve())


def storage_display(url: str) -> str:
    """The storage URL without its password (it goes into MLflow tags and the console)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL: show it as given
        return url


def open_storage(url: str, on_stale: Callable | None = None) -> Any:
    """An RDB storage with heartbeats: a trial whose process died (on any machine) is failed by
    the next worker once its heartbeat is stale."""
    import optuna

    engine_kwargs = None
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}  # several workers write to one file
    return _quiet(lambda: optuna.storages.RDBStorage(
        url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_SECONDS,
        heartbeat_stale_trial_callback=on_stale))


# --- one study, as seen by every process -------------------------------------------------------


@dataclass
class Plan:
    """Everything a worker needs (picklable: it crosses the spawn boundary)."""

    exp: Experiment
    study_name: str
    storage: str
    tracking_uri: str
    n_trials: int | None
    timeout: float | None
    parent_id: str = ""
    cell: dict[str, Any] = field(default_factory=dict)
    prune_on: str | None = None  # None: no pruning
    prune_sign: float = 1.0      # intermediate value = sign * metric (the study's direction)

    @property
    def tune(self) -> TuneSettings:
        return self.exp.tune


def make_plan(exp: Experiment, n_trials: int | None, timeout: float | None) -> Plan:
    from vaebench.models import FAMILIES

    t = exp.tune
    dims = dimensions(exp)
    if n_trials is None:
        n_trials = t.n_trials
    if timeout is None:
        timeout = t.timeout
    if n_trials is None and timeout is None:
        n_trials = _grid_size(dims) if t.sampler == "grid" else DEFAULT_TRIALS
    base = RunSettings.model_validate(tune_base_settings(exp))
    models = {base.model} | set(next((d.param.choices for d in dims if d.key == "model"), None) or [])
    stochastic = all(FAMILIES[m].stochastic for m in models)
    prune_on = None if t.pruner_name == "none" else t.pruned_metric(stochastic)
    # val/* losses are lower-is-better; the pruner compares in the study's direction.
    sign = 1.0 if prune_on == t.objectives[0] or t.study_directions[0] == "minimize" else -1.0
    return Plan(exp=exp, study_name=t.study_name or f"{exp.name}-tune", storage=resolved_storage(exp),
                tracking_uri=exp.resolved_tracking_uri(), n_trials=n_trials, timeout=timeout,
                cell=tune_fixed_cell(exp), prune_on=prune_on, prune_sign=sign)


def _grid_size(dims: list[Dimension]) -> int:
    n = 1
    for d in dims:
        n *= len(d.param.choices)
    return n


def open_study(plan: Plan, *, worker: int = 0, create: bool = False, on_stale: Callable | None = None) -> Any:
    import optuna

    storage = open_storage(plan.storage, on_stale)
    dims = dimensions(plan.exp)
    pruner = make_pruner(plan.tune)
    if create:
        study = optuna.create_study(storage=storage, study_name=plan.study_name, pruner=pruner,
                                    directions=plan.tune.study_directions, load_if_exists=True)
    else:
        study = optuna.load_study(storage=storage, study_name=plan.study_name, pruner=pruner)
    want = [d.lower() for d in plan.tune.study_directions]
    have = [d.name.lower() for d in study.directions]
    if have != want:
        raise ConfigError(plan.exp.path or "", [
            f" tune: the study {plan.study_name!r} in {storage_display(plan.storage)} has directions {have}, "
            f"the file asks for {want} ({', '.join(plan.tune.objectives)}); use another tune.study_name"])
    study.sampler = make_sampler(plan.tune, dims, sampler_seed(plan.tune.seed, len(study.trials), worker))
    return study


def trial_settings(plan: Plan, params: dict[str, Any]) -> RunSettings:
    """defaults + the fixed cell + the sampled (decoded) params."""
    from vaebench.matrix import apply_setting

    raw = tune_base_settings(plan.exp)
    for key, value in params.items():
        raw = apply_setting(raw, key, value)
    return RunSettings.model_validate(raw)


def decoded_params(plan: Plan, trial: Any) -> dict[str, Any]:
    dims = {d.key: d for d in dimensions(plan.exp)}
    return {k: dims[k].decode(v) if k in dims else v for k, v in trial.params.items()}


# --- one trial ---------------------------------------------------------------------------------


class Objective:
    """The function Optuna calls: one trial = one MLflow run."""

    def __init__(self, plan: Plan, tracker: Any, worker: int):
        self.plan, self.tracker, self.worker = plan, tracker, worker
        self.dims = dimensions(plan.exp)

    def __call__(self, trial: Any) -> float | list[float]:
        import optuna

        from vaebench import tracking
        from vaebench.matrix import RunSpec, run_key, run_name

        plan, tracker = self.plan, self.tracker
        # First of all, who runs it: if this process dies, the next `vaebench tune` on this
        # machine sees the pid is gone and fails the trial (see fail_orphans).
        trial.set_user_attr(ATTR_WORKER, _worker_id())
        params = {d.key: d.suggest(trial) for d in self.dims}
        try:  # a point of the space can still make an invalid combination of settings
            settings = trial_settings(plan, params)
        except ValueError as e:  # pydantic's ValidationError is a ValueError
            trial.set_user_attr(ATTR_ERROR, f"invalid settings: {e}"[:2000])
            raise
        axes = {**plan.cell, **params}
        spec = RunSpec(settings=settings, axes=axes, key=run_key(settings), name=run_name(settings, axes))
        run_id = tracking.start_run(tracker, f"t{trial.number}-{spec.name}", {
            tracking.TAG_KIND: "trial", "vaebench.trial_number": trial.number, TAG_STUDY: plan.study_name,
            tracking.TAG_RUN_KEY: spec.key, "vaebench.worker": _worker_id(),
            "vaebench.tuned": ",".join(params), **{k: _tag_value(v) for k, v in axes.items()}}, plan.parent_id)
        trial.set_user_attr(ATTR_RUN_ID, run_id)
        trial.set_user_attr(ATTR_RUN_KEY, spec.key)
        try:
            values = self._train_and_evaluate(trial, spec, run_id)
            tracking.set_tags(tracker, run_id, {TAG_TRIAL_STATE: "COMPLETE"})
            tracking.finish(tracker, run_id, "FINISHED")
            return values[0] if len(values) == 1 else values
        except optuna.TrialPruned as e:
            tracking.set_tags(tracker, run_id, {TAG_TRIAL_STATE: "PRUNED", "vaebench.pruned": str(e)})
            tracking.finish(tracker, run_id, "KILLED")
            raise
        except KeyboardInterrupt:
            tracking.set_tags(tracker, run_id, {TAG_TRIAL_STATE: "FAIL", tracking.TAG_ERROR: "interrupted"})
            tracking.finish(tracker, run_id, "KILLED")
            raise
        except Exception as e:
            message = f"{type(e).__name__}: {e}"
            trial.set_user_attr(ATTR_ERROR, message[:2000])
            tracking.set_tags(tracker, run_id, {TAG_TRIAL_STATE: "FAIL", tracking.TAG_ERROR: message,
                                                "vaebench.traceback": traceback.format_exc()[-4000:]})
            tracking.finish(tracker, run_id, "FAILED")
            if isinstance(e, MetricUnavailable):
                trial.study.stop()
            raise

    def _train_and_evaluate(self, trial: Any, spec: Any, run_id: str) -> list[float]:
        import optuna

        from vaebench import tracking
        from vaebench.data import load_dataset
        from vaebench.runner import log_trained
        from vaebench.train import train

        plan, tracker, s = self.plan, self.tracker, spec.settings
        data = load_dataset(s.dataset, plan.exp.resolved_data_dir(), options=s.data_config)
        tracking.log_params(tracker, run_id, spec.params())
        tracking.set_tags(tracker, run_id, {tracking.TAG_SOURCE: data.source})
        tracking.log_json(tracker, run_id, "config/trial.json", {
            "study": plan.study_name, "trial": trial.number, "params": trial.params, "run_key": spec.key,
            "cell": plan.cell, "settings": s.model_dump(mode="json"), "experiment": plan.exp.name,
            "file": str(plan.exp.path)})

        def on_epoch_end(epoch: int, metrics: dict[str, float], checkpoint: dict) -> None:
            tracking.log_metrics(tracker, run_id, metrics, step=epoch)
            if plan.prune_on is None:
                return
            if plan.prune_on not in metrics:
                raise MetricUnavailable(f"the pruner watches {plan.prune_on}, which this run does not log; "
                                        f"per-epoch metrics: {', '.join(sorted(metrics))}")
            value = metrics[plan.prune_on]
            trial.report(plan.prune_sign * value, epoch)
            if trial.should_prune():
                trial.set_user_attr(ATTR_PRUNED_AT, epoch)
                tracking.set_tags(tracker, run_id, {"vaebench.pruned_at_epoch": epoch})
                raise optuna.TrialPruned(f"at epoch {epoch}: {plan.prune_on} = {value:.5g}")

        result = train(s, data, on_epoch_end=on_epoch_end, progress=False)
        final = log_trained(plan.exp, s, data, result, tracker, run_id)  # model, evaluation, test/*
        # val/* objectives: the epoch whose weights were kept (train restores the best val/loss).
        kept = result.history[result.best_epoch] if 0 <= result.best_epoch < len(result.history) \
            else (result.history[-1] if result.history else {})
        values = []
        for metric in plan.tune.objectives:
            have = final if metric.startswith("test/") else {k: v for k, v in kept.items() if k.startswith("val/")}
            if metric not in have:
                raise MetricUnavailable(
                    f"{metric} was not computed for this trial (model {s.model}, evaluate.clustering "
                    f"{plan.exp.evaluate.clustering}); available: {', '.join(sorted(have))}")
            values.append(float(have[metric]))
        return values


def _tag_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


# --- running the study -------------------------------------------------------------------------


def _trial_line(plan: Plan, t: Any) -> str:
    params = " ".join(f"{k}={_fmt(v)}" for k, v in decoded_params(plan, t).items())
    state = t.state.name
    if state == "COMPLETE":
        what = ", ".join(f"{m}={_fmt(v)}" for m, v in zip(plan.tune.objectives, t.values))
    elif state == "PRUNED":
        what = f"at epoch {t.user_attrs.get(ATTR_PRUNED_AT, '?')}"
    else:
        what = t.user_attrs.get(ATTR_ERROR, "failed")
    took = f" ({t.duration.total_seconds():.1f}s)" if t.duration else ""
    return f"trial {t.number} {state}{took}: {what} | {params}"


def _fmt(v: Any) -> str:
    return f"{v:.5g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def optimize(plan: Plan, n_trials: int | None, timeout: float | None, *, worker: int = 0,
             echo: Printer = print) -> None:
    """Run up to `n_trials` trials (or until `timeout`) of the study in this process."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from vaebench import tracking

    tracker = tracking.connect(plan.tracking_uri, plan.exp.name)
    study = open_study(plan, worker=worker, on_stale=StaleRunCloser(plan.tracking_uri, plan.exp.name))
    callbacks = [lambda study, t: echo(_trial_line(plan, t))]
    if plan.n_trials is not None:  # the study's total, whoever runs the trials (other machines too)
        callbacks.append(MaxTrialsCallback(plan.n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    _quiet(lambda: study.optimize(Objective(plan, tracker, worker), n_trials=n_trials, timeout=timeout,
                                  catch=(Exception,), callbacks=callbacks, gc_after_trial=True))


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


def _worker_id() -> str:
    return f"{platform.node()}:{os.getpid()}"


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
    import sys

    import optuna
    import torch

    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        optimize(plan, n_trials, timeout, worker=worker, echo=lambda line: queue.put(f"[worker {worker}] {line}"))
    except KeyboardInterrupt:
        sys.exit(130)


def _run_workers(plan: Plan, remaining: int | None, timeout: float | None, n_jobs: int,
                 echo: Printer) -> list[int]:
    """N spawned processes share the study through its storage; each runs its share of the
    remaining trials. Returns the workers' exit codes."""
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
            drain(block=True)
    except KeyboardInterrupt:
        for p in procs:  # they got the same Ctrl-C; give them time to record their trials
            p.join(timeout=15)
            if p.is_alive():
                p.terminate()
        raise
    finally:
        for p in procs:
            p.join()
        drain(block=False)
    return [p.exitcode for p in procs]


def _parent_run(plan: Plan, tracker: Any) -> str:
    """The study's MLflow parent run: reused when the study is resumed."""
    from vaebench import tracking

    shown = storage_display(plan.storage)
    for run in tracking.search(tracker, f"tags.`{tracking.TAG_KIND}` = 'study'"):
        tags = run.data.tags
        if tags.get(TAG_STUDY) == plan.study_name and tags.get("optuna.storage") == shown:
            tracker.client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
    t = plan.tune
    return tracking.start_run(tracker, plan.study_name, {
        tracking.TAG_KIND: "study", TAG_STUDY: plan.study_name, "optuna.storage": shown,
        "vaebench.file": str(plan.exp.path), "vaebench.metrics": ",".join(t.objectives),
        "vaebench.directions": ",".join(t.study_directions), "vaebench.sampler": t.sampler,
        "vaebench.pruner": t.pruner_name, "vaebench.prune_on": plan.prune_on or "",
        "vaebench.cell": json.dumps(plan.cell), **tracking.machine_tags()})


def best_trials(study: Any) -> list[Any]:
    """The best trial (single objective) or the Pareto front (several)."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    return list(study.best_trials) if len(study.directions) > 1 else [study.best_trial]


def _record_study(plan: Plan, study: Any, tracker: Any, parent_id: str, best: list[Any]) -> None:
    """Tag the best trial(s) in MLflow (untagging earlier bests) and log the study's counts."""
    from optuna.trial import TrialState

    from vaebench import tracking

    best_ids = {t.user_attrs.get(ATTR_RUN_ID) for t in best} - {None}
    for run in tracking.search(tracker, f"tags.`{TAG_BEST}` = 'true'"):
        if run.data.tags.get(TAG_STUDY) == plan.study_name and run.info.run_id not in best_ids:
            tracking.set_tags(tracker, run.info.run_id, {TAG_BEST: "false"})
    for run_id in best_ids:
        tracking.set_tags(tracker, run_id, {TAG_BEST: "true"})
    counts = {s: len(study.get_trials(deepcopy=False, states=(getattr(TrialState, s),)))
              for s in ("COMPLETE", "PRUNED", "FAIL")}
    metrics = {f"trials/{s.lower()}": n for s, n in counts.items()}
    if plan.tune.multi_objective:
        metrics["best/pareto_size"] = len(best)
    elif best:
        metrics.update({f"best/{m}": v for m, v in zip(plan.tune.objectives, best[0].values)})
    tracking.log_metrics(tracker, parent_id, metrics, step=counts["COMPLETE"] + counts["PRUNED"])
    tracking.set_tags(tracker, parent_id, {"vaebench.best_trials": ",".join(str(t.number) for t in best)})
    tracking.log_json(tracker, parent_id, "study/tune.json", {
        "study": plan.study_name, "storage": storage_display(plan.storage), "cell": plan.cell,
        "tune": plan.tune.model_dump(mode="json"), "best_trials": [t.number for t in best]})


def tune_experiment(exp: Experiment, *, n_trials: int | None = None, n_jobs: int = 1,
                    timeout: float | None = None, export: str | os.PathLike | None = None,
                    echo: Printer = print) -> int:
    """Run (or resume) the study of `exp.tune`; return the exit code (0 ok; 1 no trial of this
    invocation finished, a worker crashed, or nothing to export)."""
    import optuna
    from optuna.trial import TrialState

    from vaebench import tracking

    if exp.tune is None:
        raise ConfigError(exp.path or "", [" no `tune:` section; add one (see README, Tuning), e.g.\n"
                                           "tune:\n  metric: test/elbo\n  direction: maximize\n  space:\n"
                                           "    lr: {low: 1.0e-4, high: 1.0e-2, log: true}"])
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial comes from us
    try:
        plan = make_plan(exp, n_trials, timeout)
        if n_jobs > 1 and ":memory:" in plan.storage:
            raise ConfigError(exp.path or "", [f" tune.storage: {plan.storage} cannot be shared by --jobs {n_jobs} "
                                               "worker processes; use a file or a database"])
        study = open_study(plan, create=True)
        for point in exp.tune.enqueue:
            dims = {d.key: d for d in dimensions(exp)}
            study.enqueue_trial({k: dims[k].encode(v) for k, v in point.items()}, skip_if_exists=True)
        tracker = tracking.connect(plan.tracking_uri, exp.name)
        plan.parent_id = _parent_run(plan, tracker)
        fail_orphans(study, plan, echo)
        before = {t.number for t in study.get_trials(deepcopy=False)}
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        remaining = None if plan.n_trials is None else max(0, plan.n_trials - done)
        target = f"{plan.n_trials} trials" if plan.n_trials is not None else "no trial limit"
        echo(f"study {plan.study_name!r} in {storage_display(plan.storage)}: {done} finished, {target}"
             + (f", timeout {plan.timeout:g}s" if plan.timeout else "") + f"; tracking at {plan.tracking_uri}")
        status, codes = "FINISHED", []
        try:
            if remaining != 0:
                if n_jobs > 1:
                    codes = _run_workers(plan, remaining, plan.timeout, n_jobs, echo)
                else:
                    optimize(plan, remaining, plan.timeout, echo=echo)
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            study = open_study(plan)  # what every worker wrote
            best = best_trials(study)
            _record_study(plan, study, tracker, plan.parent_id, best)
            tracking.finish(tracker, plan.parent_id, status)
        new = [t for t in study.get_trials(deepcopy=False) if t.number not in before]
        for line in summary_lines(plan, study, new, best):
            echo(line)
        code = 0
        if any(c != 0 for c in codes):
            echo(f"FAILED: worker exit codes {codes}")
            code = 1
        if new and not any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in new):
            code = 1
        if export is not None:
            if not best:
                echo("nothing to export: the study has no complete trial yet")
                return 1
            chosen = best[0] if not plan.tune.multi_objective else min(
                best, key=lambda t: -t.values[0] if plan.tune.study_directions[0] == "maximize" else t.values[0])
            path = export_best(plan, chosen, export)
            echo(f"best settings (trial {chosen.number}) written to {path}; run them with `vaebench run {path}`")
        return code
    finally:
        optuna.logging.set_verbosity(verbosity)


def summary_lines(plan: Plan, study: Any, new: list[Any], best: list[Any]) -> list[str]:
    from optuna.trial import TrialState

    def count(trials: list[Any]) -> str:
        return ", ".join(f"{sum(t.state == s for t in trials)} {s.name.lower()}"
                         for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))

    everything = study.get_trials(deepcopy=False)
    out = [f"study {plan.study_name!r}: {len(everything)} trials ({count(everything)}); "
           f"this run: {len(new)} ({count(new)})"]
    if not best:
        out.append("no complete trial yet")
    elif not plan.tune.multi_objective:
        t = best[0]
        out.append(f"best trial {t.number}: " + ", ".join(
            f"{m} = {_fmt(v)} ({d})" for m, v, d in zip(plan.tune.objectives, t.values, plan.tune.study_directions)))
        out.append("  params: " + " ".join(f"{k}={_fmt(v)}" for k, v in decoded_params(plan, t).items()))
    else:
        out.append(f"Pareto front: {len(best)} trials ({', '.join(plan.tune.objectives)})")
        for t in best:
            out.append(f"  trial {t.number}: " + ", ".join(map(_fmt, t.values)) + " | " +
                       " ".join(f"{k}={_fmt(v)}" for k, v in decoded_params(plan, t).items()))
    return out


# --- export ------------------------------------------------------------------------------------


def file_tracking_uri(exp: Experiment) -> str:
    """The file's own tracking store, absolute (without the MLFLOW_TRACKING_URI override)."""
    uri = exp.tracking_uri or "sqlite:///mlruns.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///"):]
        if rel != ":memory:" and not Path(rel).is_absolute():
            uri = "sqlite:///" + str((exp.base_dir / rel).resolve())
    return uri


def export_best(plan: Plan, trial: Any, path: str | os.PathLike) -> Path:
    """Write an experiments file whose single cell is `trial`'s settings (same run key):
    defaults = the original defaults + the cell + the trial's params, one single-value axis."""
    import yaml

    from vaebench.matrix import apply_setting, run_key

    exp = plan.exp
    params = decoded_params(plan, trial)
    settings = trial_settings(plan, params)
    raw = dict(exp.defaults)
    for key, value in {**plan.cell, **params}.items():
        if key not in ("seed", "model"):
            raw = apply_setting(raw, key, value)
    raw.pop("model", None)
    raw.pop("seed", None)
    data_dir = Path(exp.data_dir).expanduser()
    doc = {
        "name": f"{exp.name}-best",
        "tracking_uri": file_tracking_uri(exp),
        "data_dir": str(data_dir if data_dir.is_absolute() else (exp.base_dir / data_dir).resolve()),
        "seeds": [settings.seed],
        "defaults": raw,
        "matrix": {"model": [settings.model]},
        "evaluate": exp.evaluate.model_dump(mode="json", exclude_defaults=True),
    }
    check = RunSettings.model_validate({**raw, "model": settings.model, "seed": settings.seed})
    if run_key(check) != run_key(settings):  # never expected: the file would not reproduce the trial
        raise RuntimeError(f"export of trial {trial.number} does not reproduce its settings")
    values = ", ".join(f"{m} = {_fmt(v)}" for m, v in zip(plan.tune.objectives, trial.values))
    header = (f"# Exported by `vaebench tune` from {exp.path}: trial {trial.number} of the Optuna study "
              f"{plan.study_name!r} ({values}).\n# Run key {run_key(settings)}. Train it with "
              f"`vaebench run <this file>`.\n")
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
    return out
