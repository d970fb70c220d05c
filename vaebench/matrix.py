"""Expand an Experiment's matrix / include / exclude / seeds into RunSpecs.

A cell's run key is a hash of its canonical resolved settings: the same cell gets the same key
whatever the ordering or formatting of the YAML (4 vs 4.0, key order, defaults spelled out or
not). `device` and `compile` are left out of the key: where and how a run trains does not change
what it is. Settings added after keys were first written (KEY_OMITTED_AT_DEFAULT) count only where
they differ from their default, so every run logged before they existed keeps its key.

A matrix of more than MAX_CELLS cells is refused before anything is expanded; up to that, it
expands at about 20 us a cell (benchmarks/bench_matrix.py): each combination of a group of axis
values is validated once, not every cell (`_matrix_cells`).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from vaebench.config.schema import Experiment, RunSettings, in_matrix

KEY_EXCLUDES = {"device", "compile"}  # where and how a run executes, not what it is
# Settings added after run keys were first written: in a key only when they differ from these
# defaults (JSON mode), so that the runs logged before them keep their keys.
KEY_OMITTED_AT_DEFAULT: dict[str, Any] = RunSettings.model_construct().model_dump(
    mode="json", include={"lr_schedule", "val_fraction", "family_options", "prior"})
# Beyond this a study is several studies: a sweep of 10^5 cells is already months of GPU time, and
# the limit keeps `vaebench ls` of a runaway matrix (10 axes x 10 values) from eating the machine.
MAX_CELLS = 100_000
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
    """Return `settings` with `axis` (a setting name or dotted path) set to `value`, leaving
    `settings` as it was: the dicts along the path are copied, everything else is shared (a cell is
    built from the defaults this way once per axis, so a deep copy would dominate expansion)."""
    head, rest = split_axis(axis)
    out = dict(settings)
    if not rest:
        out[head] = value
        return out
    node = out
    for i, part in enumerate([head, *rest[:-1]]):
        child = node.get(part, {})
        if not isinstance(child, dict):
            where = ".".join([head, *rest][:i + 1])
            raise ValueError(f"{axis!r} does not point into a mapping setting ({where!r} is {_show_type(child)})")
        node[part] = node = dict(child)
    node[rest[-1]] = value
    return out


def _show_type(v: Any) -> str:
    return "null" if v is None else f"{type(v).__name__} {v!r}"[:60]


def run_key(settings: RunSettings) -> str:
    return _key_of(settings.model_dump(mode="json"))


def _key_of(dumped: dict[str, Any]) -> str:
    """The run key of settings dumped in JSON mode."""
    canonical = json.dumps({k: v for k, v in dumped.items() if _in_key(k, v)}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _in_key(setting: str, value: Any) -> bool:
    return setting not in KEY_EXCLUDES and not (
        setting in KEY_OMITTED_AT_DEFAULT and value == KEY_OMITTED_AT_DEFAULT[setting])


def _fragment(setting: str, value: Any) -> str:
    """`"setting":value` exactly as `_key_of`'s json.dumps writes it, so that a cell's canonical
    text can be joined from fragments made once per axis value (sorted keys, no spaces); "" for a
    setting the key leaves out."""
    if not _in_key(setting, value):
        return ""
    return json.dumps({setting: value}, sort_keys=True, separators=(",", ":"))[1:-1]


def run_name(settings: RunSettings, axes: dict[str, Any]) -> str:
    """Named from the axis values, fixed parts first: `vae-conv-z16-b4-mean-mnist-s0`."""
    parts = [fmt.format(_short(getattr(settings, k))) for k, fmt in NAME_PARTS.items()]
    parts += [f"{label}{_short(axes[axis])}" for axis, label in _named_axes(tuple(axes))]
    parts.append(f"s{settings.seed}")
    return "-".join(parts)


@functools.lru_cache(maxsize=256)
def _named_axes(axes: tuple[str, ...]) -> list[tuple[str, str]]:
    """(axis, label) of the axes a run name spells out after the fixed parts (once per set of axes:
    every cell of a matrix has the same ones). The label is the axis's last part (`kl_anneal.epochs`
    -> `epochs`) unless another named axis ends the same way: then it is the whole path."""
    named = [a for a in axes if split_axis(a)[0] not in NAME_PARTS and a != "seed"]
    leaves = [a.split(".")[-1] for a in named]
    return [(a, leaf if leaves.count(leaf) == 1 else a) for a, leaf in zip(named, leaves)]


def cell_count(exp: Experiment) -> int:
    """The cells the file asks for, before exclusions and de-duplication: the product of the axis
    lengths times the seeds, plus each include entry (times the seeds unless it sets `seed`)."""
    n = math.prod(len(values) for values in exp.matrix.values()) * len(exp.seeds) if exp.matrix else 0
    return n + sum(1 if "seed" in entry else len(exp.seeds) for entry in exp.include)


def expand(exp: Experiment) -> list[RunSpec]:
    """The cells of the matrix, minus exclusions, plus inclusions, times seeds; in file order,
    de-duplicated by run key. Refuses (MatrixError) a file that asks for more than MAX_CELLS."""
    n = cell_count(exp)
    if n > MAX_CELLS:
        sizes = " x ".join(str(len(values)) for values in exp.matrix.values()) or "no axes"
        raise MatrixError(("matrix",) if exp.matrix else ("include",),
                          f"the matrix would make {n:,} cells ({sizes} values x {len(exp.seeds)} seeds, plus "
                          f"{len(exp.include)} include entries); the limit is {MAX_CELLS:,} cells: split the "
                          "study into several files, or drop axis values")
    specs: dict[str, RunSpec] = {}
    used: set[int] = set()  # the exclude rules that removed a cell
    for spec in _matrix_cells(exp, used) if exp.matrix else []:
        if spec is not None:
            specs.setdefault(spec.key, spec)
    for i, rule in enumerate(exp.exclude):
        if i not in used:  # a typo in a value, or a value the matrix no longer has
            raise MatrixError(("exclude", i), f"{_show_rule(rule)} matches no cell of the matrix (a rule removes "
                              "the matrix's cells that have every one of its settings; include entries are "
                              "never excluded): check its values against the axes, or delete it")
    for i, entry in enumerate(exp.include):
        seeds = [entry["seed"]] if "seed" in entry else exp.seeds
        for seed in seeds:
            spec = _make_spec(exp.defaults, {**entry, "seed": seed}, ("include", i), [])
            specs.setdefault(spec.key, spec)
    if not specs:
        raise MatrixError(("exclude",) if exp.exclude else ("matrix",),
                          "the matrix expands to no runs (every cell is excluded)")
    return list(specs.values())


def _matrix_cells(exp: Experiment, used: set[int]) -> list[RunSpec | None]:
    """The matrix's cells (None where an exclude rule removes one; the rules that do go into
    `used`), validated per group of axes instead of per cell: the axes that set one setting, or
    settings validated together (RunSettings.VALIDATED_TOGETHER), form a group; each combination
    of a group's values is validated once, with the defaults, and a cell is the validated defaults
    with every group's fields put in. That is what validating each cell gives (no other validator
    reads two fields) at a fraction of the cost. Any invalid combination falls back to validating
    cell by cell, so the error is the one that cell gets."""
    axes = [*exp.matrix.items(), ("seed", exp.seeds)]
    together = set(RunSettings.VALIDATED_TOGETHER)
    groups: dict[str, list[int]] = {}  # group -> indices into `axes`
    for i, (axis, _) in enumerate(axes):
        head = split_axis(axis)[0]
        groups.setdefault("together" if head in together else head, []).append(i)
    try:
        base = RunSettings.model_validate(exp.defaults)
        parts = [_group_parts(exp.defaults, [axes[i] for i in members],
                              RunSettings.VALIDATED_TOGETHER if name == "together" else (name,))
                 for name, members in groups.items()]
    except ValidationError:
        return [_make_spec(exp.defaults, {**dict(zip(exp.matrix, combo)), "seed": seed}, ("matrix",), exp.exclude,
                           used)
                for combo in itertools.product(*exp.matrix.values()) for seed in exp.seeds]
    base_dump = base.model_dump(mode="json")
    base_flat = {f: flatten({f: v}) for f, v in base_dump.items()}  # setting -> its flattened entries
    base_text = {f: _fragment(f, v) for f, v in base_dump.items() if f not in KEY_EXCLUDES}
    key_order = sorted(base_text)  # fragments left out of the key are "" (skipped when joined)
    members = [groups[name] for name in groups]
    names = [axis for axis, _ in axes]
    # exclude rules as (setting, key, value): a key's value is looked up in its setting's entries
    rules = [[(split_axis(k)[0], k, want) for k, want in rule.items()] for rule in exp.exclude]
    out: list[RunSpec | None] = []
    for combo in itertools.product(*(range(len(values)) for _, values in axes)):
        chosen = [group[tuple(combo[i] for i in idx)] for group, idx in zip(parts, members)]
        if rules:
            dumped, flat = dict(base_dump), dict(base_flat)
            for part in chosen:
                dumped.update(part.dumped)
                flat.update(part.flat)
            hits = {r for r, rule in enumerate(rules)
                    if all(has_value(flat.get(head, {}).get(k, dumped.get(k)), want) for head, k, want in rule)}
            if hits:
                used |= hits
                out.append(None)
                continue
        fields, text = {}, dict(base_text)
        for part in chosen:
            fields.update(part.fields)
            text.update(part.text)
        cell = {name: axes[i][1][j] for i, (name, j) in enumerate(zip(names, combo))}
        settings = base.model_copy(update=fields)
        canonical = "{" + ",".join(t for f in key_order if (t := text[f])) + "}"  # == _key_of(dumped)'s text
        key = hashlib.sha256(canonical.encode()).hexdigest()[:12]
        out.append(RunSpec(settings=settings, axes=cell, key=key, name=run_name(settings, cell)))
    return out


@dataclass
class _Part:
    """The validated fields one combination of a group's axis values gives a cell."""

    fields: dict[str, Any]   # setting -> validated value
    dumped: dict[str, Any]   # setting -> value dumped in JSON mode
    flat: dict[str, dict]    # setting -> its flattened entries (for exclude rules)
    text: dict[str, str]     # setting -> its fragment of the run key's canonical text


def _group_parts(defaults: dict[str, Any], axes: list[tuple[str, list]], heads: tuple[str, ...]) -> dict[tuple, _Part]:
    """Each combination of these axes' values (by index) -> the fields it gives. Raises
    ValidationError for an invalid combination."""
    out: dict[tuple, _Part] = {}
    for combo in itertools.product(*(range(len(values)) for _, values in axes)):
        raw = defaults
        for (axis, values), j in zip(axes, combo):
            raw = apply_setting(raw, axis, values[j])
        settings = RunSettings.model_validate(raw)
        dumped = settings.model_dump(mode="json", include=set(heads))
        out[combo] = _Part({h: getattr(settings, h) for h in heads}, dumped,
                           {h: flatten({h: v}) for h, v in dumped.items()},
                           {h: _fragment(h, v) for h, v in dumped.items() if h not in KEY_EXCLUDES})
    return out


def _make_spec(defaults: dict[str, Any], axes: dict[str, Any], origin: tuple,
               exclude: list[dict[str, Any]], used: set[int] | None = None) -> RunSpec | None:
    """The cell's RunSpec, or None when an exclude rule matches it (its index goes into `used`)."""
    raw = defaults
    for axis, value in axes.items():
        raw = apply_setting(raw, axis, value)
    try:
        settings = RunSettings.model_validate(raw)
    except ValidationError as e:
        # an exclude rule may remove a cell that could not exist (prior.kind: vamp for an ae)
        if _excluded(flatten(raw), raw, exclude, used):
            return None
        err = e.errors()[0]
        raise MatrixError(origin, f"the cell {axes} is invalid: {in_matrix(err)}") from None
    dumped = settings.model_dump(mode="json")
    if exclude:
        if _excluded(flatten(dumped), dumped, exclude, used):
            return None
    return RunSpec(settings=settings, axes=axes, key=_key_of(dumped), name=run_name(settings, axes))


def _excluded(flat: dict[str, Any], cell: dict[str, Any], exclude: list[dict[str, Any]],
              used: set[int] | None) -> bool:
    hits = {r for r, rule in enumerate(exclude) if all(has_value(flat.get(k, cell.get(k)), want)
                                                       for k, want in rule.items())}
    if used is not None:
        used |= hits
    return bool(hits)


def _show_rule(rule: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in rule.items()) + "}"


def setting_value(spec: RunSpec, key: str) -> Any:
    """The cell's resolved value of a setting name or dotted path."""
    dumped = spec.settings.model_dump(mode="json")
    return flatten(dumped).get(key, dumped.get(key))


def matches(spec: RunSpec, where: dict[str, Any]) -> bool:
    """Whether the cell has every `setting (or dotted path): value` of `where` (an exclude rule, a
    reference's selection); an empty `where` matches every cell."""
    return all(has_value(setting_value(spec, k), v) for k, v in where.items())


def has_value(have: Any, want: Any) -> bool:
    """Whether a cell's resolved value `have` is the value a rule or filter asks for: the same
    value, or for a mapping ({schedule: linear, epochs: 2}) each of its entries (the entries it
    leaves out are the cell's defaults, whatever they are)."""
    if isinstance(want, dict) and want and isinstance(have, dict):
        flat = flatten(have)
        return all(same_value(flat.get(k), v) for k, v in flatten(want).items())
    return same_value(have, want)


def same_value(a: Any, b: Any) -> bool:
    """Equality as a user writes values in YAML or on the command line: `4` equals `4.0`, a number
    equals its text (`--only lr=1e-3`: PyYAML reads 1e-3 as text), `true` is not `1`."""
    if _is_num(a) and isinstance(b, str):
        b = _number_in(b)
    elif _is_num(b) and isinstance(a, str):
        a = _number_in(a)
    if _is_num(a) and _is_num(b):
        return float(a) == float(b)
    return a == b


_NUMBER_TEXT = re.compile(r"^[-+]?(\.[0-9]+|[0-9][0-9_]*(\.[0-9_]*)?)([eE][-+]?[0-9]+)?$")


def _number_in(text: str) -> Any:
    """The finite number `text` spells (1e-3, 4, -0.5), else `text` itself."""
    if not _NUMBER_TEXT.match(text):
        return text
    number = float(text.replace("_", ""))
    return number if math.isfinite(number) else text


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
