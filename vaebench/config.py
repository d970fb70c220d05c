"""The typed schema of an experiments file, and its loader.

Every error names the file, the key path (with its line where the YAML has one), the bad value and
what is allowed; `load_experiment` raises one `ConfigError` carrying all of them, and the CLI turns
it into exit code 2 before anything is trained or logged.

The run settings are validated cell by cell (defaults, then each matrix value, then each include
entry), so an error points at the place in the file the bad value came from.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_DATA_DIR = "VAEBENCH_DATA_DIR"
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class ConfigError(Exception):
    """One or more problems in an experiments file; `str()` lists them one per line."""

    def __init__(self, file: str | os.PathLike, problems: list[str]):
        self.file = str(file)
        self.problems = problems
        super().__init__("\n".join(f"{self.file}:{p}" for p in problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- run settings: one matrix cell -------------------------------------------------------------


class KLAnneal(_Strict):
    """Multiplies the KL weight by a factor in [0, 1] during training (never during evaluation).

    linear: warm-up from 0 to 1 over `epochs` epochs (Bowman et al. 2016).
    cyclical: `cycles` repeats of a warm-up over `ratio` of each cycle, spread over `epochs`
    epochs, then held at 1 (Fu et al. 2019).
    """

    schedule: Literal["none", "linear", "cyclical"] = "none"
    epochs: int = Field(0, ge=0)
    cycles: int = Field(4, ge=1)
    ratio: float = Field(0.5, gt=0.0, le=1.0)


class RunSettings(_Strict):
    """Every setting of one run. Any of them can be a matrix axis; names are the shared vocabulary
    of docs, MLflow params and report columns."""

    dataset: str = "mnist"
    dataset_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    model: str = "vae"
    arch: str = "mlp"
    arch_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    latent_dim: int = Field(16, ge=1, le=4096)
    beta: float = Field(1.0, ge=0.0)
    reduction: Literal["sum", "mean"] = "sum"
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    gaussian_sigma: float | Literal["learned"] = 1.0
    kl_anneal: KLAnneal = KLAnneal()
    binarization: Literal["none", "static", "dynamic"] = "none"
    image_size: int | None = Field(None, ge=4, le=1024)
    noise: float = Field(0.3, ge=0.0, le=10.0)
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = Field(1.0e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(128, ge=1)
    epochs: int = Field(10, ge=1)
    patience: int | None = Field(None, ge=1)
    max_train_samples: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0)
    device: str = "auto"

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from vaebench.data import DATASETS

        return _one_of(v, DATASETS, "dataset")

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from vaebench.models import FAMILIES

        return _one_of(v, FAMILIES, "model family")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        from vaebench.models import ARCHS

        return _one_of(v, ARCHS, "architecture")

    @field_validator("gaussian_sigma")
    @classmethod
    def _positive_sigma(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and v <= 0:
            raise ValueError("must be > 0 or 'learned'")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not DEVICE_PATTERN.match(v):
            raise ValueError(f"{v!r} is not a device; allowed: auto, cpu, cuda, cuda:N, mps")
        return v

    @field_validator("arch_options")
    @classmethod
    def _arch_options(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        # Every block given is validated (a typo in an unused block is still a typo).
        from vaebench.models import ARCHS

        return {a: _validate_block(ARCHS, a, o, "architecture", lambda x: x.options) for a, o in v.items()}

    @field_validator("dataset_options")
    @classmethod
    def _dataset_options(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from vaebench.data import DATASET_OPTIONS

        return {d: _validate_block(DATASET_OPTIONS, d, o, "dataset", lambda x: x) for d, o in v.items()}

    # The fields a validator reads together. Every other field is validated on its own (no
    # validator here looks at another field), which lets matrix.expand validate each axis value
    # once instead of every cell: a validator that reads several fields must name them here.
    VALIDATED_TOGETHER: ClassVar[tuple[str, ...]] = ("arch", "arch_options", "dataset", "dataset_options")

    @model_validator(mode="after")
    def _keep_chosen_options(self) -> RunSettings:
        # Keep only the block of the chosen arch/dataset, filled with its defaults: that is what
        # the run uses and what its run key must depend on.
        from vaebench.data import DATASET_OPTIONS
        from vaebench.models import ARCHS

        arch = self.arch_options.get(self.arch) or ARCHS[self.arch].options().model_dump()
        object.__setattr__(self, "arch_options", {self.arch: arch})
        if self.dataset not in self.dataset_options:
            try:
                chosen = DATASET_OPTIONS[self.dataset]().model_dump()
            except ValidationError as e:  # required options (image_folder needs a path)
                raise ValueError(f"dataset {self.dataset!r} needs dataset_options.{self.dataset}: "
                                 f"{_first_message(e)}") from None
            object.__setattr__(self, "dataset_options", {self.dataset: chosen})
        else:
            object.__setattr__(self, "dataset_options", {self.dataset: self.dataset_options[self.dataset]})
        return self

    @property
    def arch_config(self) -> dict[str, Any]:
        return self.arch_options[self.arch]

    @property
    def data_config(self) -> dict[str, Any]:
        return self.dataset_options[self.dataset]


def _one_of(value: str, registry: dict, what: str) -> str:
    if value not in registry:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(sorted(registry))}")
    return value


def _validate_block(registry: dict, name: str, options: dict, what: str, schema_of) -> dict:
    if name not in registry:
        raise ValueError(f"options for unknown {what} {name!r}; allowed: {', '.join(sorted(registry))}")
    schema = schema_of(registry[name])
    try:
        return schema.model_validate(options).model_dump()
    except ValidationError as e:
        raise ValueError(f"{name}.{_first_message(e, schema)}") from None


def _first_message(e: ValidationError, schema: type[BaseModel] | None = None) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(map(str, err["loc"])) or "value"
        if err["type"] == "extra_forbidden" and schema is not None:
            parts.append(f"{loc}: unknown option; allowed: {', '.join(schema.model_fields) or 'none'}")
        elif err["type"] == "missing":
            parts.append(f"{loc}: required")
        else:
            parts.append(f"{loc}: {err['input']!r}: {err['msg']}")
    return "; ".join(parts)


SETTING_NAMES = tuple(RunSettings.model_fields)


# --- the sections around the matrix ------------------------------------------------------------


class EvaluateSettings(_Strict):
    """The fixed evaluation protocol's knobs (same for every run of a file)."""

    iw_samples: int | Literal["auto"] = "auto"    # k of nll_iw (the literature uses 5000); auto: per device
    iw_chunk: int = Field(50_000, ge=1)           # at most this many decoded images at once
    max_test_samples: int | None = Field(None, ge=10)  # evaluate on the first N test images only
    clustering: bool = True                       # latent clustering scores + the pixel baseline
    probe_train_samples: int = Field(10_000, ge=10)  # train latents used by the kNN and the probe
    silhouette_samples: int = Field(1000, ge=10)
    knn_neighbors: int = Field(5, ge=1)
    kmeans_restarts: int = Field(10, ge=1)
    figures: bool = True                          # PNG/GIF figures as run artifacts

    @field_validator("iw_samples")
    @classmethod
    def _positive_k(cls, v: int | str) -> int | str:
        if not isinstance(v, str) and v < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return v

    def k_for(self, device_type: str) -> int:
        """`auto`: 1000 samples on a GPU; 100 on a CPU, where k=1000 costs ~30 s per 1,000 MNIST
        images for a small MLP (benchmarks/bench_evaluate.py)."""
        if self.iw_samples != "auto":
            return int(self.iw_samples)
        return IW_SAMPLES_AUTO.get(device_type, 100)


IW_SAMPLES_AUTO = {"cuda": 1000, "cpu": 100, "mps": 100}


# --- tune: an Optuna study over one cell -------------------------------------------------------

METRIC_PATTERN = re.compile(r"^(test|val)/[A-Za-z0-9_]+$")
DIRECTIONS = ("maximize", "minimize")
# Not defined for deterministic families (ae, dae): see evaluate.STOCHASTIC_ONLY and train.validate.
STOCHASTIC_METRICS = ("test/elbo", "test/bpd", "test/nll_iw", "test/nll_iw_k", "test/kl",
                      "test/active_units", "val/neg_elbo")


# Registries: name in the YAML -> class in optuna.samplers / optuna.pruners. They are the schema of
# `tune.sampler` / `tune.pruner` (as `optimizer: adam | adamw` is RunSettings'), so they live here and
# vaebench.tune.storage builds the Optuna objects from them. CmaEsSampler is left out on purpose: it
# needs the separate `cmaes` package, which vaebench does not install.
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


class SearchParam(_Strict):
    """One dimension of the search space: a range (`low`..`high`, optionally `log` and `step`) or a
    list of `choices`. `type` is inferred when omitted: `choices` -> categorical; a range -> int
    when the setting is a whole number (latent_dim, epochs, ...), else float."""

    type: Literal["float", "int", "categorical"] | None = None
    low: int | float | None = None
    high: int | float | None = None
    step: int | float | None = None
    log: bool = False
    choices: list[Any] | None = None


class TuneSettings(_Strict):
    """`vaebench tune`: the Optuna study. Trials = defaults + `cell` + a point of `space`."""

    cell: dict[str, Any] = Field(default_factory=dict)     # the matrix cell every trial starts from
    space: dict[str, SearchParam] = Field(min_length=1)    # setting (dotted path allowed) -> range
    metric: str | None = None                              # one objective ...
    direction: Literal["maximize", "minimize"] | None = None
    metrics: list[str] | None = None                       # ... or several (a Pareto front)
    directions: list[Literal["maximize", "minimize"]] | None = None
    n_trials: int | None = Field(None, ge=1)               # the study's total, counted across resumes
    timeout: float | None = Field(None, gt=0)              # seconds; stop starting new trials after it
    sampler: str = "tpe"
    sampler_options: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = Field(None, ge=0)                   # the sampler's seed
    pruner: str | None = None                              # default: median (single objective), none
    pruner_options: dict[str, Any] = Field(default_factory=dict)
    prune_on: str | None = None                            # per-epoch val/* metric the pruner watches
    storage: str | None = None                             # Optuna storage URL; default optuna.db
    study_name: str | None = Field(None, min_length=1)     # default `<name>-tune`
    enqueue: list[dict[str, Any]] = Field(default_factory=list)  # points to try first

    @property
    def objectives(self) -> list[str]:
        return list(self.metrics) if self.metrics is not None else [self.metric] if self.metric else []

    @property
    def study_directions(self) -> list[str]:
        return list(self.directions) if self.directions is not None else [self.direction] if self.direction else []

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def pruner_name(self) -> str:
        return self.pruner or ("none" if self.multi_objective else "median")

    def pruned_metric(self, stochastic: bool) -> str:
        """The per-epoch metric reported to the pruner: `prune_on`, else the objective itself when
        it is a val/* metric, else one that compares across beta and reduction: val/neg_elbo when
        every trial's model is stochastic, val/recon (nats per image) otherwise."""
        if self.prune_on:
            return self.prune_on
        if self.objectives and self.objectives[0].startswith("val/"):
            return self.objectives[0]
        return "val/neg_elbo" if stochastic else "val/recon"



class Experiment(_Strict):
    name: str = Field(min_length=1)
    tracking_uri: str | None = None
    data_dir: str = "./data"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    defaults: dict[str, Any] = Field(default_factory=dict)
    matrix: dict[str, list[Any]] = Field(default_factory=dict)
    include: list[dict[str, Any]] = Field(default_factory=list)
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    evaluate: EvaluateSettings = EvaluateSettings()
    tune: TuneSettings | None = None

    # Filled in by load_experiment (not YAML keys).
    path: Path | None = Field(None, exclude=True)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds repeat: {v}")
        if any(s < 0 for s in v):
            raise ValueError("seeds must be >= 0")
        return v

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    def resolved_tracking_uri(self) -> str:
        """MLFLOW_TRACKING_URI wins, then the file's `tracking_uri`, then a SQLite file next to
        the experiments file. Relative sqlite paths are taken relative to the experiments file."""
        uri = os.environ.get(ENV_TRACKING_URI) or self.tracking_uri or "sqlite:///mlruns.db"
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            rel = uri[len("sqlite:///"):]
            if rel != ":memory:" and not Path(rel).is_absolute():
                uri = "sqlite:///" + str((self.base_dir / rel).resolve())
        return uri

    def resolved_data_dir(self) -> Path:
        d = Path(os.environ.get(ENV_DATA_DIR) or self.data_dir).expanduser()
        return d if d.is_absolute() else (self.base_dir / d).resolve()


# --- loading -----------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


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


def _fmt_path(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


class _Problems:
    """Collects errors with their key paths; lines are looked up in the YAML node tree."""

    def __init__(self, root: yaml.Node | None):
        self.root, self.items = root, []

    def add(self, path: tuple, message: str) -> None:
        line = _line_of(self.root, path)
        where = f"{line}: " if line else " "
        self.items.append(f"{where}{_fmt_path(path)}: {message}")

    def add_validation(self, prefix: tuple, err: ValidationError, data: Any = None) -> None:
        for e in err.errors():
            loc = tuple(x for x in e["loc"] if x not in ("function-after", "literal", "int", "float", "str"))
            # pydantic prefixes union members ("float", "literal[...]"): keep the YAML-shaped path
            loc = tuple(x for x in loc if not (isinstance(x, str) and x.startswith(("literal[", "constrained-"))))
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                allowed = _allowed_keys(prefix + loc[:-1])
                msg = f"unknown key {loc[-1]!r}" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
            elif "input" in e and e["type"] != "missing" and not isinstance(e["input"], dict):
                msg = f"{e['input']!r}: {msg}"
            self.add(prefix + loc, msg)


def _allowed_keys(path: tuple) -> list[str]:
    if path == ():
        return sorted(k for k in Experiment.model_fields if k != "path")
    if path == ("tune",):
        return list(TuneSettings.model_fields)
    if len(path) == 3 and path[:2] == ("tune", "space"):
        return list(SearchParam.model_fields)
    if path[0] == "tune":
        return []
    if path[-1] == "kl_anneal":
        return list(KLAnneal.model_fields)
    if path[-1] == "evaluate":
        return list(EvaluateSettings.model_fields)
    if path[0] in ("defaults", "include") or path[-1] in ("defaults",):
        return list(SETTING_NAMES)
    return []


def load_experiment(path: str | os.PathLike) -> Experiment:
    """Read, validate and return the experiments file; raise ConfigError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(path, [f" cannot read the file: {e.strerror or e}"]) from None
    try:
        root = yaml.compose(text, Loader=_UniqueKeyLoader)
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{mark.line + 1}: " if mark else " "
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(path, [f"{where}invalid YAML: {problem}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(path, [" the file must be a mapping with at least `name` and `matrix`"])
    problems = _Problems(root)
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
    from vaebench.matrix import MatrixError, expand

    try:
        expand(exp)
    except MatrixError as e:
        problems.add(e.path, e.message)
        raise ConfigError(path, problems.items) from None
    return exp


def _check_settings(exp: Experiment, problems: _Problems) -> None:
    """Validate defaults, each matrix value and each include entry as run settings."""
    from vaebench.matrix import apply_setting, split_axis

    try:
        RunSettings.model_validate(exp.defaults)
    except ValidationError as e:
        problems.add_validation(("defaults",), e)
        return  # every cell builds on the defaults: further errors would only repeat these
    if not exp.matrix and not exp.include:
        problems.add(("matrix",), "the matrix is empty; give at least one axis, e.g. `model: [ae, vae]`")
    seen: dict[str, str] = {}
    for axis, values in exp.matrix.items():
        head, _ = split_axis(axis)
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
        if len({repr(v) for v in values}) != len(values):
            problems.add(("matrix", axis), f"duplicate values {values}")
        for i, value in enumerate(values):
            try:
                RunSettings.model_validate(apply_setting(exp.defaults, axis, value))
            except ValidationError as e:
                for err in e.errors():
                    msg = err["msg"].removeprefix("Value error, ")
                    problems.add(("matrix", axis, i), f"{value!r}: {msg}")
            except (TypeError, ValueError) as e:
                problems.add(("matrix", axis, i), f"{value!r}: {e}")
    for kind in ("include", "exclude"):
        for i, entry in enumerate(getattr(exp, kind)):
            for key in entry:
                if split_axis(key)[0] not in SETTING_NAMES:
                    problems.add((kind, i, key), f"unknown setting {key!r}; allowed: {', '.join(SETTING_NAMES)}")
        if kind == "include":
            for i, entry in enumerate(exp.include):
                cell = dict(exp.defaults)
                try:
                    for key, value in entry.items():
                        cell = apply_setting(cell, key, value)
                    RunSettings.model_validate(cell)
                except ValidationError as e:
                    problems.add_validation(("include", i), e)
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
    from vaebench.matrix import same_value, split_axis
    from vaebench.models import FAMILIES

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
            for key, message in _check_optuna_options(what, name, options):
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
        except (TypeError, ValueError) as e:
            out.append((None, f"{cls.__name__} rejects {options}: {e}"))
    return out
