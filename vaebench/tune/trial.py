"""One trial: the `Objective` Optuna calls (sample a point, train and evaluate it in its own MLflow
run, report per-epoch values to the pruner), what it records on the Optuna trial and on the run,
and the console line of a finished trial."""

from __future__ import annotations

import os
import platform
import traceback
from typing import Any, Callable

from vaebench.tune.plan import Plan, decoded_params, trial_settings
from vaebench.tune.space import dimensions, fmt

ATTR_RUN_ID, ATTR_RUN_KEY, ATTR_WORKER = "mlflow_run_id", "run_key", "worker"  # worker: "host:pid"
ATTR_ERROR, ATTR_PRUNED_AT = "error", "pruned_at_epoch"
TAG_TRIAL_STATE, TAG_STUDY = "vaebench.trial_state", "optuna.study_name"


class MetricUnavailable(RuntimeError):
    """The objective (or pruning) metric was not computed for a trial: every trial would fail the
    same way, so the study stops."""


def worker_id() -> str:
    """Who runs a trial, as recorded in ATTR_WORKER: "host:pid" (read back by `fail_orphans`)."""
    return f"{platform.node()}:{os.getpid()}"


def changed_since(plan: Plan, trial: Any) -> str | None:
    """How the file's settings for `trial`'s point differ from those it was trained with (its run
    key then and now), or None when they are the same (or it recorded none)."""
    from vaebench.matrix import run_key

    recorded = trial.user_attrs.get(ATTR_RUN_KEY)
    if recorded is None:
        return None
    try:
        now = run_key(trial_settings(plan, decoded_params(plan, trial)))
    except (ValueError, KeyError) as e:  # a point the edited file no longer allows
        return f"run key {recorded}; the file now refuses its point ({_one_line(e)})"
    return None if now == recorded else f"run key {recorded}, the file now gives {now}"


def stop_if_asked(should_stop: Callable[[], bool] | None) -> None:
    """Raise KeyboardInterrupt here when a stop was asked for (a signal sets the flag; the places
    that poll it write to no store: see workers.optimize)."""
    if should_stop is not None and should_stop():
        raise KeyboardInterrupt("stop requested")


class Objective:
    """The function Optuna calls: one trial = one MLflow run."""

    def __init__(self, plan: Plan, tracker: Any, worker: int, should_stop: Callable[[], bool] | None = None):
        """`should_stop`: polled before every batch (see `optimize`): a stop asked for by a signal
        raises KeyboardInterrupt there, never inside a write to a store."""
        self.plan, self.tracker, self.worker, self.should_stop = plan, tracker, worker, should_stop
        self.dims = dimensions(plan.exp)

    def __call__(self, trial: Any) -> float | list[float]:
        import optuna

        from vaebench import tracking
        from vaebench.matrix import RunSpec, run_key, run_name

        plan, tracker = self.plan, self.tracker
        stop_if_asked(self.should_stop)  # asked for while Optuna opened the trial
        # First of all, who runs it: if this process dies, the next `vaebench tune` on this
        # machine sees the pid is gone and fails the trial (see fail_orphans).
        trial.set_user_attr(ATTR_WORKER, worker_id())
        try:  # the storage's study may have drawn a dimension differently (the space was edited since)
            params = {d.key: d.suggest(trial) for d in self.dims}
        except ValueError as e:
            trial.set_user_attr(ATTR_ERROR, f"cannot draw the point: {e} (the space differs from the one the "
                                            f"study began with; give the new space a new tune.study_name)"[:2000])
            raise
        try:  # a point of the space can still make an invalid combination of settings
            settings = trial_settings(plan, params)
        except ValueError as e:  # pydantic's ValidationError is a ValueError
            trial.set_user_attr(ATTR_ERROR, f"invalid settings: {_one_line(e)}"[:2000])
            raise
        axes = {**plan.cell, **params}
        spec = RunSpec(settings=settings, axes=axes, key=run_key(settings), name=run_name(settings, axes))
        run_id = tracking.start_run(tracker, f"t{trial.number}-{spec.name}", {
            tracking.TAG_KIND: "trial", "vaebench.trial_number": trial.number, TAG_STUDY: plan.study_name,
            tracking.TAG_RUN_KEY: spec.key, "vaebench.worker": worker_id(),
            "vaebench.tuned": ",".join(params), **{k: tracking.tag_value(v) for k, v in axes.items()}},
            plan.parent_id)
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
        from vaebench.packed import train_one
        from vaebench.results import log_trained
        from vaebench.train import dataset_for

        plan, tracker, s = self.plan, self.tracker, spec.settings
        data = dataset_for(s, plan.exp.resolved_data_dir(), plan.exp.base_dir)
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
            # never after the last epoch: the training is done, pruning would only throw its evaluation away
            if epoch < s.epochs - 1 and trial.should_prune():
                trial.set_user_attr(ATTR_PRUNED_AT, epoch)
                tracking.set_tags(tracker, run_id, {"vaebench.pruned_at_epoch": epoch})
                raise optuna.TrialPruned(f"at epoch {epoch}: {plan.prune_on} = {value:.5g}")

        result = train_one(s, data, on_epoch_end=on_epoch_end, progress=False, should_stop=self.should_stop)
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


def _one_line(e: ValueError) -> str:
    """A pydantic ValidationError as `where: what; ...` (its own text spans lines, with input dumps
    and documentation links); any other error as it is."""
    from pydantic import ValidationError

    if not isinstance(e, ValidationError):
        return str(e)
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg'].removeprefix('Value error, ')}"
                     for err in e.errors())


def trial_line(plan: Plan, t: Any) -> str:
    """The console line of a finished trial: state, duration, values (or why not), params."""
    params = " ".join(f"{k}={fmt(v)}" for k, v in decoded_params(plan, t).items())
    state = t.state.name
    if state == "COMPLETE":
        what = ", ".join(f"{m}={fmt(v)}" for m, v in zip(plan.tune.objectives, t.values))
    elif state == "PRUNED":
        what = f"at epoch {t.user_attrs.get(ATTR_PRUNED_AT, '?')}"
    else:
        what = t.user_attrs.get(ATTR_ERROR, "failed")
    took = f" ({t.duration.total_seconds():.1f}s)" if t.duration else ""
    return f"trial {t.number} {state}{took}: {what} | {params}"
