"""The loader of an experiments file: YAML in, a validated Experiment out, or one ConfigError that
lists every problem.

Every error names the file, the key path (with its line where the YAML has one), the bad value and
what is allowed; the CLI turns a ConfigError into exit code 2 before anything is trained or logged.

The run settings are validated cell by cell (defaults, then each matrix value, then each include
entry), so an error points at the place in the file the bad value came from; then the matrix is
expanded (vaebench.matrix), which catches what only shows in combination, and the `tune:` section
is checked against it.

Hostile input is refused with the same kind of message, never a traceback or a hang: a file that is
not UTF-8 text, nesting deeper than MAX_DEPTH, YAML aliases that expand past MAX_NODES values (a
"billion laughs"), keys that are lists or mappings, numbers that are not finite (.inf, .nan, 1e400),
whole numbers beyond 64 bits, and true/false where a number belongs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import ValidationError

from vaebench.config.schema import (MAX_BYTES, MAX_DEPTH, MAX_NODES, METRIC_PATTERN, PRUNERS, RESERVED_OPTIONS,
                                    SAMPLERS, SETTING_NAMES, STOCHASTIC_METRICS, ConfigError, EvaluateSettings,
                                    Experiment, KLAnneal, LRSchedule, Prior, Reference, RunSettings, SearchParam,
                                    TuneSettings, UnreadableFile, _fmt_path, _listing, _number_problems, _show,
                                    in_matrix, metric_problem, storage_problem)
from vaebench.matrix import MatrixError, apply_setting, expand, matches, same_value, split_axis

# --- loading -----------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML silently keeps the last one), keys that
    are lists or mappings, and nesting deeper than MAX_DEPTH (PyYAML composes recursively and would
    hit Python's recursion limit); it reads 1e-3 and 1e400 as numbers, as YAML 1.2 does (PyYAML's
    YAML 1.1 takes them for text, which an exclude rule then never matches)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as e:  # a 5000-digit integer, the date 2001-13-45, ...
            problem = f"a {len(node.value)}-digit integer is beyond the 64-bit range" \
                if node.tag == "tag:yaml.org,2002:int" else f"{_show(node.value)}: {e}"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:  # `<<: *defaults`: keys given next to it override the merged ones
            continue
        if not isinstance(key_node, yaml.ScalarNode):
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be text or a number, not a list or a mapping", key_node.start_mark)
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {_show(key)} (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _document_problem(root: yaml.Node) -> tuple[yaml.Node, str] | None:
    """(node, message) when the document, with every alias expanded as the loader will see it, is
    recursive, nests deeper than MAX_DEPTH or holds more than MAX_NODES values. Iterative, and each
    node is measured once: a "billion laughs" file costs what its text costs, not what it expands to."""
    def children(node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return list(node.value) if isinstance(node, yaml.SequenceNode) else []

    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    started: set[int] = set()  # nodes whose children are being measured: the current ancestors
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            started.discard(id(node))
            kids = children(node)
            size[id(node)] = min(1 + sum(size[id(c)] for c in kids), MAX_NODES + 1)
            depth[id(node)] = 1 + max((depth[id(c)] for c in kids), default=0)
            if depth[id(node)] > MAX_DEPTH:
                return node, f"nested deeper than {MAX_DEPTH} levels once its aliases are expanded"
            continue
        if id(node) in size:
            continue
        if id(node) in started:
            return node, "an alias refers to its own anchor (a recursive structure)"
        started.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children(node) if id(c) not in size)
    if size[id(root)] > MAX_NODES:
        big = root
        while True:  # point at the innermost node that is too big on its own
            inner = next((c for c in children(big) if size[id(c)] > MAX_NODES), None)
            if inner is None:
                break
            big = inner
        return big, (f"the document holds more than {MAX_NODES:,} values once its aliases are expanded "
                     f"(each alias repeats what its anchor holds); the limit is {MAX_NODES:,}")
    return None


def _line_of(root: yaml.Node | None, path: tuple) -> int | None:
    """1-based line of the deepest node along `path` (keys and list indices)."""
    node, line = root, None
    for part in path:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if k.value == str(part)), None)
            if nxt is None:
                break
            line, node = next(k for k, _ in node.value if k.value == str(part)).start_mark.line + 1, nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


class _Problems:
    """Collects errors with their key paths; lines are looked up in the YAML node tree."""

    def __init__(self, root: yaml.Node | None):
        self.root, self.items = root, []

    def add(self, path: tuple, message: str, at: tuple | None = None) -> None:
        """`at`: where to look up the line, when it is not `path` (a bad key is shown at its parent)."""
        line = _line_of(self.root, path if at is None else at)
        where = f"{line}: " if line else " "
        self.items.append(f"{where}{_fmt_path(path)}: {message}")

    def add_validation(self, prefix: tuple, err: ValidationError, data: Any = None,
                       keep: Callable[[Any], bool] | None = None) -> None:
        """`keep`: the errors to report (default all)."""
        numbers: set[tuple] = set()  # where an `int | float` union failed as both: said once
        for e in err.errors():
            if keep is not None and not keep(e):
                continue
            loc = tuple(x for x in e["loc"] if x not in ("function-after", "literal", "int", "float", "str"))
            # pydantic prefixes union members ("float", "literal[...]"): keep the YAML-shaped path
            loc = tuple(x for x in loc if not (isinstance(x, str) and x.startswith(("literal[", "constrained-"))))
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] in ("int_parsing", "float_parsing", "int_type", "float_type") and e["loc"][-1:] in (
                    ("int",), ("float",)):
                if loc in numbers:
                    continue
                numbers.add(loc)
                msg = "Input should be a number"
            if e["type"] == "invalid_key" or loc[-1:] == ("[key]",):  # `3: x` where a name belongs
                parent, key = (loc[:-1], loc[-1]) if e["type"] == "invalid_key" else (loc[:-2], loc[-2])
                allowed = _allowed_keys(prefix + parent)
                self.add(prefix + parent, f"key {_show(key)} is not text; keys are names"
                         + (f"; allowed: {', '.join(allowed)}" if allowed else ""), at=prefix + loc[:-1])
                continue
            if e["type"] == "extra_forbidden":
                allowed = _allowed_keys(prefix + loc[:-1])
                msg = f"unknown key {loc[-1]!r}" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
            elif e.get("input", 0) is None and e["type"] in ("model_type", "dict_type", "list_type"):
                what = "a list" if e["type"] == "list_type" else "a mapping"
                msg = f"empty (the key has no value); give {what}, or leave the key out"
            elif "input" in e and e["type"] != "missing" and not isinstance(e["input"], dict):
                msg = f"{_show(e['input'])}: {msg}"
            # an options block's own message starts with the path inside it (`conv.chanels: ...`):
            # the line is that key's, not the block's
            inner = msg.split(": ", 1)[0]
            inside = tuple(inner.split(".")) if re.fullmatch(r"[A-Za-z_][\w.]*", inner) else ()
            self.add(prefix + loc, msg, at=prefix + loc + inside)


def _allowed_keys(path: tuple) -> list[str]:
    if path == ():
        return sorted(k for k in Experiment.model_fields if k != "path")
    if path == ("tune",):
        return list(TuneSettings.model_fields)
    if len(path) == 3 and path[:2] == ("tune", "space"):
        return list(SearchParam.model_fields)
    if path[0] == "tune":
        return []
    if path[0] == "reference":
        return list(Reference.model_fields) if len(path) == 2 else []
    if path[-1] == "kl_anneal":
        return list(KLAnneal.model_fields)
    if path[-1] == "lr_schedule":
        return list(LRSchedule.model_fields)
    if path[-1] == "prior":
        return list(Prior.model_fields)
    if path[-1] == "evaluate":
        return list(EvaluateSettings.model_fields)
    if path[0] in ("defaults", "include") or path[-1] in ("defaults",):
        return list(SETTING_NAMES)
    return []


def load_experiment(path: str | os.PathLike) -> Experiment:
    """Read, validate and return the experiments file; raise ConfigError listing every problem."""
    path = Path(path)
    try:
        with path.open("rb") as f:  # at most MAX_BYTES + 1: `vaebench ls /dev/zero` must not hang
            data = f.read(MAX_BYTES + 1)
    except (OSError, ValueError) as e:  # ValueError: a path with a NUL byte
        raise UnreadableFile(path, [f" cannot read the file: {getattr(e, 'strerror', None) or e}"]) from None
    if len(data) > MAX_BYTES:
        raise UnreadableFile(path, [f" cannot read the file: it is larger than {MAX_BYTES // 2**20} MiB, the limit "
                                 "for an experiments file"])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UnreadableFile(path, [f"{line}: cannot read the file: it is not UTF-8 text "
                                 f"(byte 0x{data[e.start]:02x} at offset {e.start})"]) from None
    root, raw = _parse(path, text)
    if not isinstance(raw, dict):
        raise ConfigError(path, [" the file must be a mapping with at least `name` and `matrix`"])
    # `x-` keys at the top hold YAML anchors for the rest of the file (`x-mlp: &mlp {...}`), as in
    # Compose files; they are no setting
    raw = {k: v for k, v in raw.items() if not (isinstance(k, str) and k.startswith("x-"))}
    problems = _Problems(root)
    for where, message in _number_problems(raw):
        problems.add(where, message)
    if problems.items:  # before the schema, which would only repeat them less precisely
        raise ConfigError(path, problems.items)
    try:
        exp = Experiment.model_validate(raw)
    except ValidationError as e:
        problems.add_validation((), e, raw)
        raise ConfigError(path, problems.items) from None
    exp = exp.model_copy(update={"path": path.resolve()})
    _check_settings(exp, problems)
    if not problems.items and exp.tune is not None:
        check_tune(exp, problems)
    if problems.items:
        raise ConfigError(path, problems.items)
    # Expanding catches what only shows in combination (and an empty expansion).

    try:
        specs = expand(exp)
    except MatrixError as e:
        problems.add(e.path, e.message)
        raise ConfigError(path, problems.items) from None
    _check_references(exp, specs, problems)
    if problems.items:
        raise ConfigError(path, problems.items)
    return exp


def _check_references(exp: Experiment, specs: list, problems: _Problems) -> None:
    """Each `reference:` entry names a final metric and selects at least one cell."""

    for i, ref in enumerate(exp.reference):
        if not REFERENCE_METRIC.match(ref.metric):
            problems.add(("reference", i, "metric"), f"{_show(ref.metric)} is not a final metric; expected test/<name> "
                                                     "as logged, e.g. test/nll_iw, test/elbo, test/recon_mse")
        unknown = [k for k in ref.where if split_axis(k)[0] not in SETTING_NAMES or "" in k.split(".")]
        for key in unknown:
            problems.add(("reference", i, "where", key),
                         f"unknown setting {key!r}; allowed: {', '.join(SETTING_NAMES)}")
        selected = [] if unknown else [spec for spec in specs if matches(spec, ref.where)]
        if not unknown and not selected:
            problems.add(("reference", i, "where"), f"{_show(ref.where)} matches no cell of the matrix")
        families = {spec.settings.model for spec in selected}
        if REFERENCE_METRIC.match(ref.metric) and (
                why := metric_problem(ref.metric, families, exp.evaluate.clustering)) is not None:
            problems.add(("reference", i, "metric"), why)


REFERENCE_METRIC = re.compile(r"^test/[A-Za-z0-9_]+$")


def _parse(path: Path, text: str) -> tuple[yaml.Node | None, Any]:
    """The YAML node tree (for line numbers) and the document it holds, parsed once."""
    loader = None
    try:
        loader = _UniqueKeyLoader(text)
        root = loader.get_single_node()
        bad = _document_problem(root) if root is not None else None
        if bad:
            node, message = bad
            raise yaml.composer.ComposerError(None, None, message, node.start_mark)
        return root, loader.construct_document(root) if root is not None else None
    except yaml.reader.ReaderError as e:  # a control character; it has a position, not a mark
        line = text.count("\n", 0, e.position) + 1
        char = chr(e.character) if isinstance(e.character, int) else e.character
        raise ConfigError(path, [f"{line}: invalid YAML: character {char!r} is not allowed "
                                 "(control characters cannot appear in YAML text)"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{mark.line + 1}: " if mark else " "
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(path, [f"{where}invalid YAML: {problem}"]) from None
    finally:
        if loader is not None:
            loader.dispose()


_EMPTY_PART = "{!r} is not a setting path: a dotted path has a name between every two dots, e.g. kl_anneal.epochs"


def _path_message(key: str, err: Any) -> str | None:
    """A dotted setting path that names a key its setting does not have (`kl_anneal.epoch`): what
    to say instead of pydantic's "Extra inputs are not permitted"; None for any other error."""
    if err["type"] != "extra_forbidden" or "." not in key:
        return None
    parent, name = tuple(str(x) for x in err["loc"][:-1]), err["loc"][-1]
    allowed = _allowed_keys(("defaults", *parent))
    return (f"{key!r} is not a setting path: {'.'.join(parent) or 'a run'} has no key {name!r}"
            + (f"; allowed: {', '.join(allowed)}" if allowed else ""))


def _canonical(value: Any) -> Any:
    """What makes two values of an axis the same cell: 4 and 4.0 are, true and 1 are not."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ("number", float(value))
    return repr(value)


def _at(err: Any, keys: set[str]) -> bool:
    """Whether a pydantic error is at one of these top-level settings."""
    return bool(err["loc"]) and err["loc"][0] in keys


def _check_settings(exp: Experiment, problems: _Problems) -> None:
    """Validate defaults, each matrix value and each include entry as run settings."""

    base: dict[str, Any] = exp.defaults
    isolated = False  # the defaults had errors: only the errors at a value's own keys are its own
    try:
        RunSettings.model_validate(exp.defaults)
    except ValidationError as e:
        problems.add_validation(("defaults",), e)
        wrong = {err["loc"][0] for err in e.errors() if err["loc"]}
        if len(wrong) < len(e.errors()):  # a problem of the defaults as a whole: nothing can be isolated
            return
        # The matrix and the includes are still checked, so that one run lists every problem: on the
        # defaults without their wrong keys, for the errors of their own keys only (the others would
        # repeat the defaults' problems, or come from the keys left out).
        base, isolated = {k: v for k, v in exp.defaults.items() if k not in wrong}, True
    if not exp.matrix and not exp.include:
        problems.add(("matrix",), "the matrix is empty; give at least one axis, e.g. `model: [ae, vae]`")
    seen: dict[str, str] = {}
    for axis, values in exp.matrix.items():
        head, _ = split_axis(axis)
        if "" in axis.split(".") and head in SETTING_NAMES:
            problems.add(("matrix", axis), _EMPTY_PART.format(axis))
            continue
        if head not in SETTING_NAMES:
            problems.add(("matrix", axis), f"unknown setting {head!r}; allowed axes: {', '.join(SETTING_NAMES)}")
            continue
        if head == "seed":
            problems.add(("matrix", axis), "duplicate axis: seeds are set by the top-level `seeds` list")
            continue
        if head in seen and (seen[head] == axis or "." not in axis or "." not in seen[head]):
            problems.add(("matrix", axis), f"duplicate axis: {axis!r} overlaps {seen[head]!r}")
            continue
        seen[head] = axis
        if not values:
            problems.add(("matrix", axis), "empty list: an axis needs at least one value")
        first: dict[Any, int] = {}
        for i, value in enumerate(values):
            j = first.setdefault(_canonical(value), i)
            if j != i:  # 4 and 4.0 are one cell
                problems.add(("matrix", axis, i), f"duplicate value {_show(value)} (also at [{j}])")
                break
        # A problem of the value with the other settings (loc ()) may be one the other axes solve, or
        # an exclude rule removes: the expansion judges it cell by cell. Alone, it is this value's.
        combined = len(exp.matrix) > 1 or bool(exp.exclude)
        for i, value in enumerate(values):
            try:
                RunSettings.model_validate(apply_setting(base, axis, value))
            except ValidationError as e:
                wrong_path = next(filter(None, (_path_message(axis, err) for err in e.errors())), None)
                if wrong_path:  # the axis's name, not this value: said once
                    problems.add(("matrix", axis), wrong_path)
                    break
                for err in e.errors():
                    if (combined and not err["loc"]) or (isolated and not _at(err, {head})):
                        continue
                    problems.add(("matrix", axis, i), f"{_show(value)}: {in_matrix(err)}")
            except (TypeError, ValueError) as e:
                problems.add(("matrix", axis, i), f"{_show(value)}: {e}")
    for kind in ("include", "exclude"):
        for i, entry in enumerate(getattr(exp, kind)):
            for key in entry:
                if split_axis(key)[0] not in SETTING_NAMES:
                    problems.add((kind, i, key), f"unknown setting {key!r}; allowed: {', '.join(SETTING_NAMES)}")
                elif "" in key.split("."):
                    problems.add((kind, i, key), _EMPTY_PART.format(key))
        if kind == "include":
            for i, entry in enumerate(exp.include):
                if any(split_axis(key)[0] not in SETTING_NAMES or "" in key.split(".") for key in entry):
                    continue  # reported above; the schema would only say it again
                cell = dict(base)
                try:
                    for key, value in entry.items():
                        cell = apply_setting(cell, key, value)
                    RunSettings.model_validate(cell)
                except ValidationError as e:
                    heads = {split_axis(key)[0] for key in entry}
                    problems.add_validation(("include", i), e,
                                            keep=(lambda err: _at(err, heads)) if isolated else None)
                except (TypeError, ValueError) as e:
                    problems.add(("include", i), str(e))


# --- tune: what the schema alone cannot say ------------------------------------------------------
# Here rather than in vaebench.tune: load_experiment validates the whole file, and the config layer
# never imports the tuner above it (the tuner imports these helpers from here).


def tune_fixed_cell(exp: Experiment) -> dict[str, Any]:
    """The fixed part of every trial, as axis -> value: the matrix's single-valued axes, then
    `tune.cell`, then the first seed. Settings = defaults + these + the sampled point."""
    cell = {axis: values[0] for axis, values in exp.matrix.items() if len(values) == 1}
    cell.update(exp.tune.cell if exp.tune else {})
    cell.setdefault("seed", exp.seeds[0])
    return cell


def tune_base_settings(exp: Experiment) -> dict[str, Any]:
    """defaults + the fixed cell, as a raw (unvalidated) settings dict."""

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
    from vaebench.models import FAMILIES

    t = exp.tune
    n_problems = len(problems.items)

    # The cell: every multi-valued axis needs a value; axis values must come from the axis.
    for i_key, (key, value) in enumerate(t.cell.items()):
        head, _ = split_axis(key)
        if head not in SETTING_NAMES:
            problems.add(("tune", "cell", key), f"unknown setting {key!r}; allowed: {', '.join(SETTING_NAMES)}")
        elif "" in key.split("."):
            problems.add(("tune", "cell", key), _EMPTY_PART.format(key))
        elif key in exp.matrix and not any(same_value(value, v) for v in exp.matrix[key]):
            problems.add(("tune", "cell", key), f"{_show(value)} is not a value of the matrix axis {key!r}; "
                                                f"allowed: {_listing(exp.matrix[key])}")
    missing = [a for a, vs in exp.matrix.items() if len(vs) > 1 and a not in t.cell and a not in t.space]
    if missing:
        problems.add(("tune", "cell"), "pick one matrix cell for the study: give a value for "
                     + ", ".join(f"{a!r} (one of {_listing(exp.matrix[a])})" for a in missing))
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
    seen: list[str] = []  # the space's keys so far
    kinds: dict[str, str] = {}
    for key, p in t.space.items():
        where = ("tune", "space", key)
        head, rest = split_axis(key)
        if head not in SETTING_NAMES:
            problems.add(where, f"unknown setting {head!r}; allowed: {', '.join(SETTING_NAMES)}")
            continue
        if "" in key.split("."):
            problems.add(where, _EMPTY_PART.format(key))
            continue
        if head in ("seed", "device"):
            problems.add(where, f"{head!r} is not a hyperparameter (set it in defaults or tune.cell)")
            continue
        parts = key.split(".")
        # one key inside another (`arch_options.mlp` and `arch_options.mlp.activation`): the
        # wider one, applied last, would silently overwrite what was sampled for the narrower
        over = next((k for k in seen if (other := k.split("."))[:len(parts)] == parts[:len(other)]), None)
        if over is not None:
            problems.add(where, f"overlaps {over!r} in the space")
            continue
        seen.append(key)
        if key in t.cell:
            problems.add(where, f"{key!r} is also fixed in tune.cell; keep it in one place")
            continue
        if head in ("arch_options", "dataset_options", "family_options") and rest:
            chosen = {"arch_options": "arch", "dataset_options": "dataset", "family_options": "model"}[head]
            if rest[0] != getattr(base_settings, chosen) and chosen not in t.space:
                problems.add(where, f"has no effect: the cell's {chosen} is {getattr(base_settings, chosen)!r}, "
                                    f"not {rest[0]!r}")
                continue
            choices = t.space[chosen].choices if chosen in t.space else None
            if choices is not None and not any(same_value(rest[0], c) for c in choices):
                problems.add(where, f"has no effect: {rest[0]!r} is not among the space's {chosen} choices "
                                    f"({_listing(choices)})")
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
        elif m == "val/kl" and (plain := sorted(x for x in models if x in FAMILIES and not FAMILIES[x].regularised)):
            problems.add(where, f"val/kl is always 0 for {' and '.join(map(repr, plain))} (no regulariser); "
                                "use e.g. val/recon or val/loss")
        elif (why := metric_problem(m, models, exp.evaluate.clustering)) is not None:
            problems.add(where, why)

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
    if t.prune_on and t.pruner_name == "none" and (t.pruner is not None or t.multi_objective):
        why = "pruner: none" if t.pruner == "none" else "several metrics (a multi-objective study is not pruned)"
        problems.add(("tune", "prune_on"), f"has no effect with {why}; remove it"
                     + (f", or choose a pruner ({', '.join(p for p in PRUNERS if p != 'none')})"
                        if t.pruner == "none" else ""))
    for what, name, options, registry in (("sampler", t.sampler, t.sampler_options, SAMPLERS),
                                          ("pruner", t.pruner_name, t.pruner_options, PRUNERS)):
        if options and name in registry:
            for key, message in _check_optuna_options(what, name, options):
                problems.add(("tune", f"{what}_options") + ((key,) if key else ()), message)

    # Storage and warm-start points.
    if t.storage is not None and (bad := storage_problem(t.storage)):
        problems.add(("tune", "storage"), bad)
    for i, point in enumerate(t.enqueue):
        for key, value in point.items():
            p = t.space.get(key)
            if p is None:
                problems.add(("tune", "enqueue", i, key), f"not in the space; allowed: {', '.join(t.space)}")
            elif p.choices is not None:
                if not any(same_value(value, c) for c in p.choices):
                    problems.add(("tune", "enqueue", i, key),
                                 f"{_show(value)} is not one of the choices {_show(p.choices)}")
            elif p.low is not None and p.high is not None and (
                    isinstance(value, bool) or not isinstance(value, (int, float))):
                problems.add(("tune", "enqueue", i, key), f"{_show(value)} is not a number; the range is "
                                                         f"[{p.low}, {p.high}]")
            elif p.low is not None and p.high is not None and not p.low <= value <= p.high:
                problems.add(("tune", "enqueue", i, key), f"{_show(value)} is outside [{p.low}, {p.high}]")
            elif kinds.get(key) == "int" and value != int(value):  # Optuna would truncate it, with a warning
                problems.add(("tune", "enqueue", i, key), f"{_show(value)}: {key} takes whole numbers")


def _check_param(base: dict[str, Any], key: str, p: SearchParam, kind: str, problems: _Problems) -> None:

    where = ("tune", "space", key)
    said = False  # the key itself is wrong (a dotted path to nothing): said once, not per value

    def valid(value: Any, at: tuple) -> bool:
        try:
            RunSettings.model_validate(apply_setting(base, key, value))
            return True
        except ValidationError as e:
            nonlocal said
            wrong_path = next(filter(None, (_path_message(key, err) for err in e.errors())), None)
            if wrong_path:
                if not said:
                    problems.add(where, wrong_path)
                said = True
                return False
            msg = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
            problems.add(at, f"{_show(value)} is not a valid {key}: {msg}")
        except (TypeError, ValueError) as e:
            problems.add(at, f"{_show(value)}: {e}")
        return False

    if kind == "categorical":
        if p.choices is None:
            problems.add(where, "a categorical parameter needs `choices: [...]`")
            return
        if not p.choices:
            problems.add(where + ("choices",), "empty list: give at least one choice")
            return
        if len({repr(c) for c in p.choices}) != len(p.choices):
            problems.add(where + ("choices",), f"duplicate choices {_show(p.choices)}")
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
    elif p.step is not None and not _steps_fit(p.low, p.high, p.step):
        # Optuna would shrink the range to the last step that fits, with a warning every trial
        fit = p.low + ((p.high - p.low) // p.step) * p.step
        problems.add(where + ("step",), f"{p.step!r} does not divide high - low ({p.high!r} - {p.low!r}); "
                                        f"e.g. high: {fit:g}, or a step that divides {p.high - p.low:g}")
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


def _steps_fit(low: float, high: float, step: float) -> bool:
    """Whether high - low is a whole number of steps (to a relative 1e-9: 0.1 steps in floats)."""
    n = (high - low) / step
    return abs(n - round(n)) <= 1e-9 * max(1.0, abs(n))


def _check_optuna_options(what: str, name: str, options: dict[str, Any]) -> list[tuple[str | None, str]]:
    """Problems with `tune.sampler_options` / `tune.pruner_options`: unknown or reserved keys, and
    values the Optuna class rejects (it is built once here, so a bad value fails at load)."""
    import inspect
    import warnings

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
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                cls(**options)
        except Exception as e:  # noqa: BLE001 - any failure of the class on these options is the user's to fix
            out.append((None, f"{cls.__name__} rejects {_show(options)}: {type(e).__name__}: {e}"))
    return out
