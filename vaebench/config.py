"""The typed schema of an experiments file, and its loader.

Every error names the file, the key path (with its line where the YAML has one), the bad value and
what is allowed; `load_experiment` raises one `ConfigError` carrying all of them, and the CLI turns
it into exit code 2 before anything is trained or logged.

The run settings are validated cell by cell (defaults, then each matrix value, then each include
entry), so an error points at the place in the file the bad value came from.

Hostile input is refused with the same kind of message, never a traceback or a hang: a file that is
not UTF-8 text, nesting deeper than MAX_DEPTH, YAML aliases that expand past MAX_NODES values (a
"billion laughs"), keys that are lists or mappings, numbers that are not finite (.inf, .nan, 1e400),
whole numbers beyond 64 bits, and true/false where a number belongs.
"""

from __future__ import annotations

import functools
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

ENV_DATA_DIR = "VAEBENCH_DATA_DIR"
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# An experiments file nests about 6 levels deep and holds a few hundred values; these bound what a
# hostile one costs (aliases are counted as often as they are used).
MAX_DEPTH = 32
MAX_NODES = 1_000_000
MAX_BYTES = 8 * 2**20  # 100,000 include entries fit in half of it
INT64_MAX = 2**63 - 1  # what torch, numpy, SQLite (MLflow, Optuna) can hold


class ConfigError(Exception):
    """One or more problems in an experiments file; `str()` lists them one per line."""

    def __init__(self, file: str | os.PathLike, problems: list[str]):
        self.file = str(file)
        self.problems = [p.translate(_LINE_BREAKS) for p in problems]  # a key may hold a line break
        super().__init__("\n".join(f"{self.file}:{p}" for p in self.problems))


# Characters str.splitlines() breaks at -> their escapes.
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


class _Strict(BaseModel):
    # allow_inf_nan=False: "inf", "nan" and overflowing literals are no number a run can use.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="wrap")
    @classmethod
    def _plain_numbers(cls, value: Any, handler: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads `latent_dim: true` as 1 and takes integers of any size.
        if isinstance(value, (bool, list)):
            problem = _bool_problem(cls.model_fields[info.field_name].annotation, value)
            if problem:
                raise ValueError(problem)
        out = handler(value)
        if (type(out) is int and abs(out) > INT64_MAX) or (
                isinstance(out, list) and any(type(v) is int and abs(v) > INT64_MAX for v in out)):
            raise ValueError(f"beyond the 64-bit range; allowed: whole numbers up to {INT64_MAX:.3g} in size")
        return out


@functools.lru_cache(maxsize=None)
def _number_kind(annotation: Any) -> str | None:
    """'whole number' or 'number' when a field takes numbers but not booleans, else None."""
    def takes(a: Any) -> set[str]:
        origin, args = typing.get_origin(a), typing.get_args(a)
        if origin is typing.Annotated:
            return takes(args[0])
        if origin in (Union, types.UnionType):
            return set().union(*(takes(x) for x in args))
        if origin is Literal:
            return {"bool" if isinstance(x, bool) else "int" if isinstance(x, int) else "other" for x in args}
        return {"bool"} if a is bool else {"int"} if a is int else {"float"} if a is float else \
            {"bool"} if a is Any else set() if a is type(None) else {"other"}

    kinds = takes(annotation)
    if "bool" in kinds or not kinds & {"int", "float"}:
        return None
    return "number" if "float" in kinds else "whole number"


def _bool_problem(annotation: Any, value: Any) -> str | None:
    """YAML's true/false where a number (or a list of numbers) belongs; pydantic reads them as 1/0."""
    if isinstance(value, bool):
        kind = _number_kind(annotation)
    elif isinstance(value, list) and typing.get_origin(annotation) is list and any(isinstance(v, bool) for v in value):
        kind = _number_kind(typing.get_args(annotation)[0])
    else:
        return None
    return f"expected a {kind}, not true/false" if kind else None


def _listing(values: list, limit: int = 12) -> str:
    """The allowed values of an axis, for a message: the first few when there are many."""
    shown = ", ".join(_show(v, 40) if not isinstance(v, str) else v[:40] for v in values[:limit])
    return shown + (f", ... ({len(values)} values)" if len(values) > limit else "")


def _show(value: Any, limit: int = 80) -> str:
    """repr() for messages, cut short: a value from a hostile file can be huge."""
    if type(value) is int and abs(value) > 10**limit:
        return f"<a {len(str(abs(value)))}-digit number>" if abs(value) < 10**4000 else "<a huge number>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 4] + " ..."


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


class Prior(_Strict):
    """p(z) of the families that take a choice (models.FAMILIES[model].priors: vae, iwae).

    standard: N(0, I).
    vamp: the VampPrior (Tomczak & Welling 2018), the mixture of the model's posteriors at
        `pseudo_inputs` learned pseudo-inputs; elbo and nll_iw are evaluated under it.
    """

    kind: Literal["standard", "vamp"] = "standard"
    pseudo_inputs: int = Field(500, ge=1, le=100_000)


class LRSchedule(_Strict):
    """The learning rate over the epochs: set at the start of every epoch from the epoch number alone
    (vaebench.train.lr_at), so a resumed run continues the schedule exactly. The factor times `lr`:

    none: 1.
    step: gamma ** (epoch // step_size) (torch's StepLR).
    cosine: (1 + cos(pi * epoch / epochs)) / 2 (torch's CosineAnnealingLR with T_max = epochs).
    geometric: stage i (i = 0, 1, ...) lasts growth ** i epochs at gamma ** i (Burda et al. 2015,
        App. C: growth 3, gamma 10^(-1/7) ~ 0.7197, stages i = 0..7, 3,280 epochs).
    """

    kind: Literal["none", "step", "cosine", "geometric"] = "none"
    step_size: int = Field(10, ge=1)
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    growth: int = Field(3, ge=1)


class RunSettings(_Strict):
    """Every setting of one run. Any of them can be a matrix axis; names are the shared vocabulary
    of docs, MLflow params and report columns."""

    dataset: str = "mnist"
    dataset_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    model: str = "vae"
    family_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    prior: Prior = Prior()
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
    lr_schedule: LRSchedule = LRSchedule()
    batch_size: int = Field(128, ge=1)
    epochs: int = Field(10, ge=1)
    patience: int | None = Field(None, ge=1)
    max_train_samples: int | None = Field(None, ge=1)
    # the share of the dataset's training set held out (stratified, fixed seed) as the validation split
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    seed: int = Field(0, ge=0)
    device: str = "auto"
    # How the training step runs: `graphs` captures it once in a CUDA graph and replays it; `off`
    # runs it eagerly; `auto` = graphs on CUDA, off elsewhere (there are no graphs to capture).
    compile: Literal["auto", "off", "graphs"] = "auto"

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

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false: `compile: off` means what it says
        return "off" if v is False else v

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

    @field_validator("family_options")
    @classmethod
    def _family_options(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from vaebench.models import FAMILIES

        return {m: _validate_block(FAMILIES, m, o, "model family", lambda x: x.Options) for m, o in v.items()}

    @field_validator("dataset_options")
    @classmethod
    def _dataset_options(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from vaebench.data import DATASET_OPTIONS

        return {d: _validate_block(DATASET_OPTIONS, d, o, "dataset", lambda x: x) for d, o in v.items()}

    # The fields a validator reads together. Every other field is validated on its own (no
    # validator here looks at another field), which lets matrix.expand validate each axis value
    # once instead of every cell: a validator that reads several fields must name them here.
    VALIDATED_TOGETHER: ClassVar[tuple[str, ...]] = ("arch", "arch_options", "dataset", "dataset_options", "model",
                                                     "family_options", "prior", "latent_dim")

    @model_validator(mode="after")
    def _keep_chosen_options(self) -> RunSettings:
        # Keep only the block of the chosen arch/dataset/family, filled with its defaults: that is
        # what the run uses and what its run key must depend on. A family without options of its
        # own keeps none (the run keys of ae, vae and dae stay what they were before families had
        # options).
        from vaebench.data import DATASET_OPTIONS
        from vaebench.models import ARCHS, FAMILIES

        arch = self.arch_options.get(self.arch) or ARCHS[self.arch].options().model_dump()
        object.__setattr__(self, "arch_options", {self.arch: arch})
        family = FAMILIES[self.model]
        if family.Options.model_fields:
            chosen = self.family_options.get(self.model) or family.Options().model_dump()
            try:
                family.check(self.latent_dim, family.Options.model_validate(chosen))
            except ValueError as e:
                raise ValueError(f"model {self.model!r}: {e}") from None
            object.__setattr__(self, "family_options", {self.model: chosen})
        else:
            object.__setattr__(self, "family_options", {})
        if self.prior.kind not in family.priors:
            takers = [m for m, f in FAMILIES.items() if self.prior.kind in f.priors]
            raise ValueError(f"prior.kind {self.prior.kind!r} is not available for model {self.model!r}; "
                             f"allowed models: {', '.join(takers)} (exclude the other cells: "
                             f"exclude: [{{model: {self.model}, prior.kind: {self.prior.kind}}}])")
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

    @property
    def family_config(self) -> dict[str, Any]:
        """The chosen family's options ({} for a family without any)."""
        return self.family_options.get(self.model, {})


def _one_of(value: str, registry: dict, what: str) -> str:
    if value not in registry:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(sorted(registry))}")
    return value


def _validate_block(registry: dict, name: str, options: dict, what: str, schema_of) -> dict:
    if name not in registry:
        raise ValueError(f"options for unknown {what} {name!r}; allowed: {', '.join(sorted(registry))}")
    schema = schema_of(registry[name])
    # Option schemas are plain pydantic models next to their arch/dataset: hold them to our number rules.
    for key, value in options.items():
        problem = key in schema.model_fields and _bool_problem(schema.model_fields[key].annotation, value)
        if problem:
            raise ValueError(f"{name}.{key}: {_show(value)}: {problem}")
    try:
        out = schema.model_validate(options).model_dump()
    except ValidationError as e:
        raise ValueError(f"{name}.{_first_message(e, schema)}") from None
    for path, problem in _number_problems(out):
        raise ValueError(f"{name}.{_fmt_path(path)}: {problem}")
    return out


def _first_message(e: ValidationError, schema: type[BaseModel] | None = None) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(map(str, err["loc"])) or "value"
        if err["type"] == "extra_forbidden" and schema is not None:
            parts.append(f"{loc}: unknown option; allowed: {', '.join(schema.model_fields) or 'none'}")
        elif err["type"] == "missing":
            parts.append(f"{loc}: required")
        else:
            parts.append(f"{loc}: {_show(err['input'])}: {err['msg']}")
    return "; ".join(parts)


def _number_problems(value: Any, path: tuple = ()) -> typing.Iterator[tuple[tuple, str]]:
    """(key path, message) for every number in `value` (a loaded YAML document or part of one) that
    no setting can take: not finite, or an integer beyond 64 bits. Keys included."""
    if isinstance(value, float) and not math.isfinite(value):
        yield path, (f"{value}: not a finite number (.inf, .nan or a literal beyond 1.8e308 such as 1e400); "
                     "allowed: finite numbers")
    elif type(value) is int and abs(value) > INT64_MAX:
        yield path, f"{_show(value)}: beyond the 64-bit range; allowed: whole numbers up to {INT64_MAX:.3g} in size"
    elif isinstance(value, dict):
        for k, v in value.items():
            for _, message in _number_problems(k):
                yield path + (k,), f"key {message}"
            yield from _number_problems(v, path + (k,))
    elif isinstance(value, (list, tuple, set, frozenset)):
        for i, v in enumerate(value):
            yield from _number_problems(v, path + (i,))


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
    latent_projection: Literal["pca", "tsne"] = "pca"  # latent_scatter.png beyond 2 dims (tsne: seeded subsample)

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



class Reference(_Strict):
    """A published number to put beside ours in the report: `value` of `metric` (a test/* metric as
    logged) for the cells matching `where` (settings or dotted paths, as in exclude rules; none: every
    cell), from `source`. The report flags a cell (and the mean of a selection of several) whose
    value is more than `tolerance` (absolute, in the metric's units) away."""

    metric: str
    value: float
    source: str = Field(min_length=1)
    where: dict[str, Any] = Field(default_factory=dict)
    tolerance: float | None = Field(None, ge=0.0)


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
    reference: list[Reference] = Field(default_factory=list)

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


def _fmt_path(path: tuple) -> str:
    out = ""
    for p in path:
        if isinstance(p, int) and not isinstance(p, bool):
            out += f"[{p}]"
            continue
        # a key as written, unless it would not read as one (empty, blanks, unprintable, not text)
        name = p if isinstance(p, str) and p.isprintable() and p and p.strip() == p and " " not in p else repr(p)
        out += f".{name}" if out else name
    return out or "(top level)"


class _Problems:
    """Collects errors with their key paths; lines are looked up in the YAML node tree."""

    def __init__(self, root: yaml.Node | None):
        self.root, self.items = root, []

    def add(self, path: tuple, message: str, at: tuple | None = None) -> None:
        """`at`: where to look up the line, when it is not `path` (a bad key is shown at its parent)."""
        line = _line_of(self.root, path if at is None else at)
        where = f"{line}: " if line else " "
        self.items.append(f"{where}{_fmt_path(path)}: {message}")

    def add_validation(self, prefix: tuple, err: ValidationError, data: Any = None) -> None:
        for e in err.errors():
            loc = tuple(x for x in e["loc"] if x not in ("function-after", "literal", "int", "float", "str"))
            # pydantic prefixes union members ("float", "literal[...]"): keep the YAML-shaped path
            loc = tuple(x for x in loc if not (isinstance(x, str) and x.startswith(("literal[", "constrained-"))))
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "invalid_key" or loc[-1:] == ("[key]",):  # `3: x` where a name belongs
                parent, key = (loc[:-1], loc[-1]) if e["type"] == "invalid_key" else (loc[:-2], loc[-2])
                allowed = _allowed_keys(prefix + parent)
                self.add(prefix + parent, f"key {_show(key)} is not text; keys are names"
                         + (f"; allowed: {', '.join(allowed)}" if allowed else ""), at=prefix + loc[:-1])
                continue
            if e["type"] == "extra_forbidden":
                allowed = _allowed_keys(prefix + loc[:-1])
                msg = f"unknown key {loc[-1]!r}" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
            elif "input" in e and e["type"] != "missing" and not isinstance(e["input"], dict):
                msg = f"{_show(e['input'])}: {msg}"
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
        raise ConfigError(path, [f" cannot read the file: {getattr(e, 'strerror', None) or e}"]) from None
    if len(data) > MAX_BYTES:
        raise ConfigError(path, [f" cannot read the file: it is larger than {MAX_BYTES // 2**20} MiB, the limit "
                                 "for an experiments file"])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(path, [f"{line}: cannot read the file: it is not UTF-8 text "
                                 f"(byte 0x{data[e.start]:02x} at offset {e.start})"]) from None
    root, raw = _parse(path, text)
    if not isinstance(raw, dict):
        raise ConfigError(path, [" the file must be a mapping with at least `name` and `matrix`"])
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
    from vaebench.matrix import MatrixError, expand

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
    from vaebench.matrix import matches, split_axis

    for i, ref in enumerate(exp.reference):
        if not REFERENCE_METRIC.match(ref.metric):
            problems.add(("reference", i, "metric"), f"{_show(ref.metric)} is not a final metric; expected test/<name> "
                                                     "as logged, e.g. test/nll_iw, test/elbo, test/recon_mse")
        unknown = [k for k in ref.where if split_axis(k)[0] not in SETTING_NAMES or "" in k.split(".")]
        for key in unknown:
            problems.add(("reference", i, "where", key),
                         f"unknown setting {key!r}; allowed: {', '.join(SETTING_NAMES)}")
        if not unknown and not any(matches(spec, ref.where) for spec in specs):
            problems.add(("reference", i, "where"), f"{_show(ref.where)} matches no cell of the matrix")


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


def _canonical(value: Any) -> Any:
    """What makes two values of an axis the same cell: 4 and 4.0 are, true and 1 are not."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ("number", float(value))
    return repr(value)


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
        for i, value in enumerate(values):
            try:
                RunSettings.model_validate(apply_setting(exp.defaults, axis, value))
            except ValidationError as e:
                for err in e.errors():
                    msg = err["msg"].removeprefix("Value error, ")
                    problems.add(("matrix", axis, i), f"{_show(value)}: {msg}")
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
    heads: dict[str, str] = {}
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
        if head in heads and (heads[head] == key or not rest or "." not in heads[head]):
            problems.add(where, f"overlaps {heads[head]!r} in the space")
            continue
        heads[head] = key
        if key in t.cell:
            problems.add(where, f"{key!r} is also fixed in tune.cell; keep it in one place")
            continue
        if head in ("arch_options", "dataset_options", "family_options") and rest:
            chosen = {"arch_options": "arch", "dataset_options": "dataset", "family_options": "model"}[head]
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
                    problems.add(("tune", "enqueue", i, key),
                                 f"{_show(value)} is not one of the choices {_show(p.choices)}")
            elif p.low is not None and p.high is not None and (
                    isinstance(value, bool) or not isinstance(value, (int, float)) or not p.low <= value <= p.high):
                problems.add(("tune", "enqueue", i, key), f"{_show(value)} is outside [{p.low}, {p.high}]")


def _check_param(base: dict[str, Any], key: str, p: SearchParam, kind: str, problems: _Problems) -> None:
    from vaebench.matrix import apply_setting

    where = ("tune", "space", key)

    def valid(value: Any, at: tuple) -> bool:
        try:
            RunSettings.model_validate(apply_setting(base, key, value))
            return True
        except ValidationError as e:
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
        except Exception as e:  # noqa: BLE001 - any failure of the class on these options is the user's to fix
            out.append((None, f"{cls.__name__} rejects {_show(options)}: {type(e).__name__}: {e}"))
    return out
