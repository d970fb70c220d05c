"""Checks of the `tune:` section that the schema alone cannot express: that the fixed cell and
the space are run settings, ranges are sane, the metrics exist for the chosen model, and the
sampler and pruner fit the study. Called by `vaebench.config.load_experiment`; the fixed cell and
base settings are shared with the tuner itself.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from vaebench.config import (METRIC_PATTERN, SETTING_NAMES, STOCHASTIC_METRICS, Experiment, RunSettings,
                             SearchParam, _Problems)
from vaebench.matrix import same_value


def tune_fixed_cell(exp: Experiment) -> dict[str, Any]:
    """The fixed part of every trial, as axis -> value: the matrix's single-valued axes, then
    `tune.cell`, then the first seed. Settings = defaults + these + the sampled point."""
    cell = {axis: values[0] for axis, values in exp.matrix.items() if len(values) == 1}
    cell.update(exp.tune.cell if exp.tune else {})
    cell.setdefault("seed", exp.seeds[0])
    return cell


def tune_base_settings(exp: Experiment) -> dict[str, Any]:
    """defaults + the fixed cell, as a raw (unvalidated) settings dict."""
    from vaebench.matrix import apply_setting

    raw = dict(exp.defaults)
    for key, value in tune_fixed_cell(exp).items():
        raw = apply_setting(raw, key, value)
    return raw


def param_kind(base: dict[str, Any], key: str, param: SearchParam) -> str:
    """float | int | categorical: `type` if given, else inferred from `choices` or from whether
    the setting takes whole numbers only (probed with a fractional value)."""
    if param.type:
        return param.type
    if param.choices is not None:
        return "categorical"
    if param.low is None:
        return "float"
    from vaebench.matrix import apply_setting

    try:
        RunSettings.model_validate(apply_setting(base, key, float(param.low) + 0.5))
    except ValidationError as e:
        whole = any(err["type"] == "int_from_float" or "fractional part" in err["msg"] for err in e.errors())
        return "int" if whole else "float"
    except (TypeError, ValueError):
        return "float"
    return "float"


def check_tune(exp: Experiment, problems: _Problems) -> None:
    """What the schema alone cannot say about `tune:`: that the cell and the space are run
    settings, ranges are sane, metrics exist for the chosen model, and sampler/pruner fit."""
    from vaebench.matrix import split_axis
    from vaebench.models import FAMILIES
    from vaebench.tune import PRUNERS, SAMPLERS

    t = exp.tune
    n_problems = len(problems.items)

    # The cell: every multi-valued axis needs a value; axis values must come from the axis.
    for i_key, (key, value) in enumerate(t.cell.items()):
        head, _ = split_axis(key)
        if head not in SETTING_NAMES:
            problems.add(("tune", "cell", key), f"unknown setting {key!r}; allowed: {', '.join(SETTING_NAMES)}")
        elif key in exp.matrix and not any(same_value(value, v) for v in exp.matrix[key]):
            problems.add(("tune", "cell", key), f"{value!r} is not a value of the matrix axis {key!r}; "
                                                f"allowed: {', '.join(map(str, exp.matrix[key]))}")
    missing = [a for a, vs in exp.matrix.items() if len(vs) > 1 and a not in t.cell and a not in t.space]
    if missing:
        problems.add(("tune", "cell"), "pick one matrix cell for the study: give a value for "
                     + ", ".join(f"{a!r} (one of {', '.join(map(str, exp.matrix[a]))})" for a in missing))
    if len(problems.items) > n_problems:
        return
    base = tune_base_settings(exp)
    try:
        base_settings = RunSettings.model_validate(base)
    except ValidationError as e:
        problems.add_validation(("tune", "cell"), e)
        return

    # The space.
    models = {base_settings.model}
    heads: dict[str, str] = {}
    kinds: dict[str, str] = {}
    for key, p in t.space.items():
        where = ("tune", "space", key)
        head, rest = split_axis(key)
        if head not in SETTING_NAMES:
            problems.add(where, f"unknown setting {head!r}; allowed: {', '.join(SETTING_NAMES)}")
            continue
        if head in ("seed", "device"):
            problems.add(where, f"{head!r} is not a hyperparameter (set it in defaults or tune.cell)")
            continue
        if head in heads and (heads[head] == key or not rest or "." not in heads[head]):
            problems.add(where, f"overlaps {heads[head]!r} in the space")
            continue
        heads[head] = key
        if key in t.cell:
            problems.add(where, f"{key!r} is also fixed in tune.cell; keep it in one place")
            continue
        if head in ("arch_options", "dataset_options") and rest:
            chosen = "arch" if head == "arch_options" else "dataset"
            if rest[0] != getattr(base_settings, chosen) and chosen not in t.space:
                problems.add(where, f"has no effect: the cell's {chosen} is {getattr(base_settings, chosen)!r}, "
                                    f"not {rest[0]!r}")
                continue
        kind = param_kind(base, key, p)
        kinds[key] = kind
        n_before = len(problems.items)
        _check_param(base, key, p, kind, problems)
        if len(problems.items) == n_before and head == "model":
            models.update(p.choices or [])
        if len(problems.items) == n_before:
            object.__setattr__(p, "type", kind)  # resolved once here; tune.py reads it

    # Objectives and directions.
    if (t.metric is None) == (t.metrics is None):
        problems.add(("tune",), "give the objective as `metric` + `direction`, or as `metrics` + "
                                "`directions` (several: a Pareto front), e.g. metric: test/elbo, direction: maximize")
    elif t.metric is not None and t.direction is None:
        problems.add(("tune", "metric"), "needs a `direction`: maximize or minimize")
    elif t.metric is not None and t.directions is not None:
        problems.add(("tune", "directions"), "with a single `metric` give `direction`, not `directions`")
    elif t.metrics is not None:
        if not t.metrics:
            problems.add(("tune", "metrics"), "empty list: give at least one metric")
        if t.direction is not None:
            problems.add(("tune", "direction"), "with `metrics` give `directions` (one per metric)")
        elif t.directions is None or len(t.directions) != len(t.metrics):
            problems.add(("tune", "directions"), f"give one direction per metric ({len(t.metrics)}), "
                                                 "each maximize or minimize")
        if len(set(t.metrics)) != len(t.metrics):
            problems.add(("tune", "metrics"), f"duplicate metrics {t.metrics}")
    deterministic = sorted(m for m in models if m in FAMILIES and not FAMILIES[m].stochastic)
    named = [(("tune", "metric"), t.metric)] if t.metric else [
        (("tune", "metrics", i), m) for i, m in enumerate(t.metrics or [])]
    if t.prune_on:
        named.append((("tune", "prune_on"), t.prune_on))
    for where, m in named:
        if not METRIC_PATTERN.match(m):
            problems.add(where, f"{m!r} is not a metric name; expected test/<name> (final evaluation, "
                                "e.g. test/elbo, test/nmi) or val/<name> (e.g. val/loss)")
        elif where[1] == "prune_on" and not m.startswith("val/"):
            problems.add(where, f"{m!r}: the pruner watches a per-epoch validation metric (val/loss, "
                                "val/recon, val/kl, val/neg_elbo)")
        elif m in STOCHASTIC_METRICS and deterministic:
            problems.add(where, f"{m} is not defined for the deterministic model "
                                f"{' and '.join(map(repr, deterministic))} (no ELBO); use e.g. test/recon_bce "
                                "or restrict the study to vae")

    # Sampler and pruner.
    if t.sampler not in SAMPLERS:
        hint = " (Optuna's CmaEsSampler needs the `cmaes` package, which vaebench does not install)" \
            if t.sampler == "cmaes" else ""
        problems.add(("tune", "sampler"), f"unknown sampler {t.sampler!r}; allowed: {', '.join(SAMPLERS)}{hint}")
    elif t.sampler == "grid":
        ranged = [k for k, kind in kinds.items() if kind != "categorical"]
        if ranged:
            problems.add(("tune", "sampler"), "grid needs a categorical-only space (`choices`); "
                                              f"these are ranges: {', '.join(ranged)}")
    if t.pruner is not None and t.pruner not in PRUNERS:
        problems.add(("tune", "pruner"), f"unknown pruner {t.pruner!r}; allowed: {', '.join(PRUNERS)}")
    elif t.pruner not in (None, "none") and t.multi_objective:
        problems.add(("tune", "pruner"), "Optuna does not support pruning for multi-objective studies; "
                                         "remove `pruner` (or set it to none), or optimise one metric")
    for what, name, options, registry in (("sampler", t.sampler, t.sampler_options, SAMPLERS),
                                          ("pruner", t.pruner_name, t.pruner_options, PRUNERS)):
        if options and name in registry:
            from vaebench.tune import check_options

            for key, message in check_options(what, name, options):
                problems.add(("tune", f"{what}_options") + ((key,) if key else ()), message)

    # Storage and warm-start points.
    if t.storage is not None and "://" not in t.storage:
        problems.add(("tune", "storage"), f"{t.storage!r} is not an Optuna storage URL; e.g. "
                                          "sqlite:///optuna.db or postgresql://user@host/db")
    for i, point in enumerate(t.enqueue):
        for key, value in point.items():
            p = t.space.get(key)
            if p is None:
                problems.add(("tune", "enqueue", i, key), f"not in the space; allowed: {', '.join(t.space)}")
            elif p.choices is not None:
                if not any(same_value(value, c) for c in p.choices):
                    problems.add(("tune", "enqueue", i, key), f"{value!r} is not one of the choices {p.choices}")
            elif p.low is not None and p.high is not None and (
                    isinstance(value, bool) or not isinstance(value, (int, float)) or not p.low <= value <= p.high):
                problems.add(("tune", "enqueue", i, key), f"{value!r} is outside [{p.low}, {p.high}]")


def _check_param(base: dict[str, Any], key: str, p: SearchParam, kind: str, problems: _Problems) -> None:
    from vaebench.matrix import apply_setting

    where = ("tune", "space", key)

    def valid(value: Any, at: tuple) -> bool:
        try:
            RunSettings.model_validate(apply_setting(base, key, value))
            return True
        except ValidationError as e:
            msg = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
            problems.add(at, f"{value!r} is not a valid {key}: {msg}")
        except (TypeError, ValueError) as e:
            problems.add(at, f"{value!r}: {e}")
        return False

    if kind == "categorical":
        if p.choices is None:
            problems.add(where, "a categorical parameter needs `choices: [...]`")
            return
        if not p.choices:
            problems.add(where + ("choices",), "empty list: give at least one choice")
            return
        if len({repr(c) for c in p.choices}) != len(p.choices):
            problems.add(where + ("choices",), f"duplicate choices {p.choices}")
        for field in ("low", "high", "step"):
            if getattr(p, field) is not None:
                problems.add(where + (field,), "not used with `choices` (a range takes low/high, a list takes choices)")
        if p.log:
            problems.add(where + ("log",), "not used with `choices`")
        for i, c in enumerate(p.choices):
            valid(c, where + ("choices", i))
        return
    if p.choices is not None:
        problems.add(where + ("choices",), f"a {kind} range takes low/high, not choices (or set type: categorical)")
        return
    if p.low is None or p.high is None:
        problems.add(where, "give a range (`low` and `high`) or `choices`")
        return
    if p.low > p.high:
        problems.add(where + ("low",), f"{p.low!r} is greater than high ({p.high!r})")
        return
    if kind == "int":
        for field in ("low", "high", "step"):
            v = getattr(p, field)
            if v is not None and float(v) != int(v):
                problems.add(where + (field,), f"{v!r}: {key} takes whole numbers")
    if p.step is not None and p.step <= 0:
        problems.add(where + ("step",), f"{p.step!r}: must be > 0")
    if p.log and p.low <= 0:
        problems.add(where + ("low",), f"{p.low!r}: a log range needs low > 0")
    if p.log and p.step is not None and not (kind == "int" and p.step == 1):
        problems.add(where + ("step",), "cannot be combined with log: true (Optuna samples log ranges continuously)")
    if kind == "float":
        probe = param_kind(base, key, SearchParam(low=p.low, high=p.high))
        if probe == "int":
            problems.add(where + ("type",), f"{key} takes whole numbers: use type: int (or leave type out)")
            return
    for field in ("low", "high"):
        valid(int(getattr(p, field)) if kind == "int" else getattr(p, field), where + (field,))
