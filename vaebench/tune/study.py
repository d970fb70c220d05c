"""Running a study end to end (`tune_experiment`, what `vaebench tune` calls): open or resume it,
its MLflow parent run, the trials (here or in worker processes), then record the outcome (the best
trial(s) tagged, the study's counts logged) and print the summary."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from vaebench.config import ConfigError, Experiment
from vaebench.tune.export import export_best
from vaebench.tune.plan import Plan, decoded_params, make_plan, open_study
from vaebench.tune.space import dimensions, fmt
from vaebench.tune.storage import storage_display
from vaebench.tune.trial import ATTR_RUN_ID, TAG_STUDY, changed_since
from vaebench.tune.workers import Printer, fail_orphans, optimize, run_ray_workers, run_workers

TAG_BEST = "vaebench.best"


def tune_experiment(exp: Experiment, *, n_trials: int | None = None, n_jobs: int = 1,
                    timeout: float | None = None, export: str | os.PathLike | None = None,
                    echo: Printer = print, ray_address: str | None = None, on_ray: bool = False,
                    should_stop: Callable[[], bool] | None = None) -> int:
    """Run (or resume) the study of `exp.tune`; return the exit code (0 ok; 1 no trial of this
    invocation finished, a worker crashed, or nothing to export). `n_jobs` workers share the
    study: local processes, or with `on_ray` tasks on the Ray cluster at `ray_address`. In one
    process `should_stop` ends it at the next batch or after the trial being evaluated
    (workers.optimize); with local workers it tells them to (workers.run_workers)."""
    import optuna
    from optuna.trial import TrialState

    from vaebench import tracking

    if exp.tune is None:
        # one line: a ConfigError shows each problem on one line (line breaks come out escaped)
        raise ConfigError(exp.path or "", [" no `tune:` section; add one (see README, Tuning), e.g. "
                                           "`tune: {metric: test/elbo, direction: maximize, space: "
                                           "{lr: {low: 1.0e-4, high: 1.0e-2, log: true}}}`"])
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial comes from us
    try:
        plan = make_plan(exp, n_trials, timeout)
        if (n_jobs > 1 or on_ray) and ":memory:" in plan.storage:
            raise ConfigError(exp.path or "", [f" tune.storage: {plan.storage} cannot be shared by "
                                               f"{'Ray tasks' if on_ray else f'--jobs {n_jobs} worker processes'}; "
                                               "use a file or a database"])
        study = open_study(plan, create=True)
        for point in exp.tune.enqueue:
            dims = {d.key: d for d in dimensions(exp)}
            study.enqueue_trial({k: dims[k].encode(v) for k, v in point.items()}, skip_if_exists=True)
        tracker = tracking.connect(plan.tracking_uri, exp.name, echo)
        plan.parent_id = _parent_run(plan, tracker)
        fail_orphans(study, plan, echo)
        # the trials this invocation runs are the ones not there yet and the enqueued ones (WAITING)
        before = {t.number for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING}
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        remaining = None if plan.n_trials is None else max(0, plan.n_trials - done)
        target = f"{plan.n_trials} trials" if plan.n_trials is not None else "no trial limit"
        echo(f"study {plan.study_name!r} in {storage_display(plan.storage)}: {done} finished, {target}"
             + (f", timeout {plan.timeout:g}s" if plan.timeout else "") + f"; tracking at {plan.tracking_uri}")
        _warn_if_edited(plan, study, echo)
        status, codes = "FINISHED", []
        try:
            if remaining != 0:
                if on_ray:
                    codes = run_ray_workers(plan, remaining, plan.timeout, n_jobs, echo, ray_address)
                elif n_jobs > 1:
                    codes = run_workers(plan, remaining, plan.timeout, n_jobs, echo, should_stop)
                else:
                    optimize(plan, remaining, plan.timeout, echo=echo, should_stop=should_stop)
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            study = open_study(plan)  # what every worker wrote
            fail_orphans(study, plan, echo)  # a worker that crashed left its trial RUNNING
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
            changed = changed_since(plan, chosen)
            if changed is not None:  # the file would train something else than the trial did
                echo(f"not exported: the best trial ({chosen.number}) was trained with settings this file no "
                     f"longer gives ({changed}); revert the edit, or tune afresh under a new tune.study_name")
                return 1
            path = export_best(plan, chosen, export)
            echo(f"best settings (trial {chosen.number}) written to {path}; run them with `vaebench run {path}`")
        return code
    finally:
        optuna.logging.set_verbosity(verbosity)


def _warn_if_edited(plan: Plan, study: Any, echo: Printer) -> None:
    """A resumed study whose file was edited since (epochs, the defaults...) would mix trials of two
    settings silently: say so."""
    from optuna.trial import TrialState

    edited = [(t, why) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if (why := changed_since(plan, t)) is not None]
    if edited:
        t, why = edited[0]
        echo(f"warning: {len(edited)} of the study's finished trials were trained with settings this file no "
             f"longer gives (trial {t.number}: {why}); the study now mixes the two. To compare like with "
             "like, revert the edit or give tune.study_name a new name")


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
        # this study's trials only: another storage may hold a study of the same name
        if run.data.tags.get("mlflow.parentRunId") == parent_id and run.info.run_id not in best_ids:
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
            f"{m} = {fmt(v)} ({d})" for m, v, d in zip(plan.tune.objectives, t.values, plan.tune.study_directions)))
        out.append("  params: " + " ".join(f"{k}={fmt(v)}" for k, v in decoded_params(plan, t).items()))
    else:
        out.append(f"Pareto front: {len(best)} trials ({', '.join(plan.tune.objectives)})")
        for t in best:
            out.append(f"  trial {t.number}: " + ", ".join(map(fmt, t.values)) + " | " +
                       " ".join(f"{k}={fmt(v)}" for k, v in decoded_params(plan, t).items()))
    return out
