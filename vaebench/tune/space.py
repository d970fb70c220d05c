"""The search space of a study: one `Dimension` per key of `tune.space`, which knows how to ask an
Optuna trial for a value and how values Optuna cannot store travel through it (as JSON text)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vaebench.config import Experiment, SearchParam, param_kind, tune_base_settings


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


def grid_size(dims: list[Dimension]) -> int:
    """The number of points of a categorical-only space (the grid sampler's whole grid)."""
    n = 1
    for d in dims:
        n *= len(d.param.choices)
    return n


def fmt(v: Any) -> str:
    """A value (a param, a metric) as the console shows it."""
    return f"{v:.5g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)
