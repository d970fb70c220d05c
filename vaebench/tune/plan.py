"""One study as seen by every process: the picklable `Plan` (the experiment, the study's name and
storage, the trial budget, the fixed cell, what the pruner watches), opening the study it names,
and turning a trial's params into the settings of its run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from vaebench.config import ConfigError, Experiment, RunSettings, TuneSettings, tune_base_settings, tune_fixed_cell
from vaebench.tune.space import dimensions, grid_size
from vaebench.tune.storage import make_pruner, make_sampler, open_storage, resolved_storage, sampler_seed, \
    storage_display

DEFAULT_TRIALS = 20


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
        n_trials = grid_size(dims) if t.sampler == "grid" else DEFAULT_TRIALS
    base = RunSettings.model_validate(tune_base_settings(exp))
    models = {base.model} | set(next((d.param.choices for d in dims if d.key == "model"), None) or [])
    stochastic = all(FAMILIES[m].stochastic for m in models)
    prune_on = None if t.pruner_name == "none" else t.pruned_metric(stochastic)
    # val/* losses are lower-is-better; the pruner compares in the study's direction.
    sign = 1.0 if prune_on == t.objectives[0] or t.study_directions[0] == "minimize" else -1.0
    return Plan(exp=exp, study_name=t.study_name or f"{exp.name}-tune", storage=resolved_storage(exp),
                tracking_uri=exp.resolved_tracking_uri(), n_trials=n_trials, timeout=timeout,
                cell=tune_fixed_cell(exp), prune_on=prune_on, prune_sign=sign)


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
