"""Expand an Experiment's matrix / include / exclude / seeds into RunSpecs.

A cell's run key is a hash of its canonical resolved settings: the same cell gets the same key
whatever the ordering or formatting of the YAML (4 vs 4.0, key order, defaults spelled out or
not). `device` and `compile` are left out of the key: where and how a run trains does not change
what it is.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from vaebench.config import Experiment, RunSettings

KEY_EXCLUDES = {"device", "compile"}  # where and how a run executes, not what it is
# Short forms for run names, in the order they appear: vae-conv-z16-b4-mean-mnist-s0.
NAME_PARTS: dict[str, str] = {"model": "{}", "arch": "{}", "latent_dim": "z{}", "beta": "b{}",
                              "reduction": "{}", "dataset": "{}"}


class MatrixError(Exception):
    def __init__(self, path: tuple, message: str):
        self.path, self.message = path, message
        super().__init__(message)


@dataclass(frozen=True)
class RunSpec:
    settings: RunSettings
    axes: dict[str, Any] = field(hash=False)  # axis name -> value for this cell (incl. seed)
    key: str = ""
    name: str = ""

    def params(self) -> dict[str, str]:
        """Every setting, flattened to `a.b` keys (MLflow params)."""
        return {k: _param_str(v) for k, v in flatten(self.settings.model_dump(mode="json")).items()}


def split_axis(axis: str) -> tuple[str, list[str]]:
    head, *rest = axis.split(".")
    return head, rest


def apply_setting(settings: dict[str, Any], axis: str, value: Any) -> dict[str, Any]:
    """Return a copy of `settings` with `axis` (a setting name or dotted path) set to `value`."""
    head, rest = split_axis(axis)
    out = copy.deepcopy(settings)
    if not rest:
        out[head] = value
        return out
    node = out.setdefault(head, {})
    for part in rest[:-1]:
        if not isinstance(node, dict):
            raise ValueError(f"{axis!r}: {part!r} is not a mapping")
        node = node.setdefault(part, {})
    if not isinstance(node, dict):
        raise ValueError(f"{axis!r} does not point into a mapping setting")
    node[rest[-1]] = value
    return out


def run_key(settings: RunSettings) -> str:
    canonical = json.dumps(settings.model_dump(mode="json", exclude=KEY_EXCLUDES),
                           sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def run_name(settings: RunSettings, axes: dict[str, Any]) -> str:
    """Named from the axis values, fixed parts first: `vae-conv-z16-b4-mean-mnist-s0`."""
    parts = [fmt.format(_short(getattr(settings, k))) for k, fmt in NAME_PARTS.items()]
    for axis, value in axes.items():
        if split_axis(axis)[0] not in NAME_PARTS and axis != "seed":
            parts.append(f"{axis.split('.')[-1]}{_short(value)}")
    parts.append(f"s{settings.seed}")
    return "-".join(parts)


def expand(exp: Experiment) -> list[RunSpec]:
    """The cells of the matrix, minus exclusions, plus inclusions, times seeds; in file order,
    de-duplicated by run key."""
    axes = list(exp.matrix.items())
    cells: list[tuple[dict[str, Any], tuple]] = []  # (axis values, where it came from)
    for combo in itertools.product(*(values for _, values in axes)) if axes else []:
        values = dict(zip((a for a, _ in axes), combo))
        cells.append((values, ("matrix",)))
    specs: dict[str, RunSpec] = {}
    for values, origin in cells:
        for seed in exp.seeds:
            spec = _make_spec(exp, {**values, "seed": seed}, origin)
            if not any(_matches(spec, rule) for rule in exp.exclude):
                specs.setdefault(spec.key, spec)
    for i, entry in enumerate(exp.include):
        seeds = [entry["seed"]] if "seed" in entry else exp.seeds
        for seed in seeds:
            spec = _make_spec(exp, {**entry, "seed": seed}, ("include", i))
            specs.setdefault(spec.key, spec)
    if not specs:
        raise MatrixError(("exclude",) if exp.exclude else ("matrix",),
                          "the matrix expands to no runs (every cell is excluded)")
    return list(specs.values())


def _make_spec(exp: Experiment, axes: dict[str, Any], origin: tuple) -> RunSpec:
    raw = dict(exp.defaults)
    for axis, value in axes.items():
        raw = apply_setting(raw, axis, value)
    try:
        settings = RunSettings.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise MatrixError(origin, f"the cell {axes} is invalid: {err['msg']}") from None
    return RunSpec(settings=settings, axes=axes, key=run_key(settings), name=run_name(settings, axes))


def setting_value(spec: RunSpec, key: str) -> Any:
    """The cell's resolved value of a setting name or dotted path."""
    dumped = spec.settings.model_dump(mode="json")
    return flatten(dumped).get(key, dumped.get(key))


def same_value(a: Any, b: Any) -> bool:
    """Equality as a user writes values in YAML: `4` equals `4.0`, `true` is not `1`."""
    if _is_num(a) and _is_num(b):
        return float(a) == float(b)
    return a == b


def _matches(spec: RunSpec, rule: dict[str, Any]) -> bool:
    """An exclude rule matches when every key equals the cell's resolved value (so `beta: 4`
    matches a cell with beta 4.0)."""
    return all(same_value(setting_value(spec, key), want) for key, want in rule.items())


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, dict):
        return "_".join(f"{_short(x)}" for x in v.values())
    if isinstance(v, list):
        return "x".join(_short(x) for x in v)
    return str(v)


def _param_str(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)
