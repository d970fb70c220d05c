"""`vaebench tune --export`: the best trial written as an experiments file of one cell (same run
key as the trial), for `vaebench run`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vaebench.config import Experiment, RunSettings
from vaebench.outputs import write_atomic
from vaebench.tune.plan import Plan, decoded_params, trial_settings
from vaebench.tune.space import fmt


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
    defaults = the original defaults + the cell + the trial's params, one single-value axis.
    `path` is the file (the CLI resolves a folder first: `vaebench.outputs.output_path`)."""
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
    values = ", ".join(f"{m} = {fmt(v)}" for m, v in zip(plan.tune.objectives, trial.values))
    header = (f"# Exported by `vaebench tune` from {exp.path}: trial {trial.number} of the Optuna study "
              f"{plan.study_name!r} ({values}).\n# Run key {run_key(settings)}. Train it with "
              f"`vaebench run <this file>`.\n")
    return write_atomic(Path(path), header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
