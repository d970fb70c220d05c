"""The typed schema of an experiments file: the pydantic models of one run's settings (RunSettings),
the sections around the matrix (evaluate, tune, reference) and the whole file (Experiment), with
the registries and limits they check against, and ConfigError, the one error of the config layer.

A model validates one value at a time; what only shows in a whole file (where in the YAML a value
came from, how axes combine, the `tune:` cell against the matrix) is vaebench.config.loader's.
This module is the bottom of the stack: matrix, trainers and the tuner import it; it imports none
of them.
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
        # in the file's order (a problem without a line, about the file as a whole, first); a key may
        # hold a line break
        self.problems = sorted((p.translate(_LINE_BREAKS) for p in problems), key=_line_number)
        super().__init__("\n".join(f"{self.file}:{p}" for p in self.problems))


class UnreadableFile(ConfigError):
    """The experiments file could not be read at all (missing, not text, too large)."""


class Conflict(ValueError):
    """Two settings that cannot go together; `rule`: the exclude rule that removes such matrix cells
    (a matrix's error shows it, `in_matrix`; a tuning trial's does not: its space has no rules)."""

    def __init__(self, message: str, rule: dict[str, Any]):
        super().__init__(message)
        self.rule = rule


def in_matrix(err: Any) -> str:
    """A pydantic error's message for a matrix cell: with the exclude rule of a Conflict."""
    msg = err["msg"].removeprefix("Value error, ")
    conflict = err.get("ctx", {}).get("error")
    if isinstance(conflict, Conflict):
        rule = ", ".join(f"{k}: {v}" for k, v in conflict.rule.items())
        msg += f" (exclude the other cells: exclude: [{{{rule}}}])"
    return msg


def _line_number(problem: str) -> int:
    head = problem.split(":", 1)[0]
    return int(head) if head.isdigit() else 0


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

    @field_validator("gaussian_sigma", mode="before")
    @classmethod
    def _sigma_word(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "learned":  # one message, not one per type the field takes
            try:
                float(v)  # a number in quotes is read as the number, as everywhere
            except ValueError:
                raise ValueError("must be a number > 0 or 'learned'") from None
        return v

    @field_validator("gaussian_sigma")
    @classmethod
    def _positive_sigma(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and v <= 0:
            raise ValueError("must be > 0 or 'learned'")
        return v

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false: `compile: off` means what it says; `on` is no value
        if v is True:
            raise ValueError("on/true/yes is not a compile setting; allowed: auto (graphs on CUDA, off "
                             "elsewhere), off, graphs")
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
            raise Conflict(f"prior.kind {self.prior.kind!r} is not available for model {self.model!r}; "
                           f"allowed models: {', '.join(takers)}", {"model": self.model, "prior.kind": self.prior.kind})
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
        inside = all(err["loc"] for err in e.errors())
        raise ValueError(f"{name}{'.' if inside else ': '}{_first_message(e, schema)}") from None
    for path, problem in _number_problems(out):
        raise ValueError(f"{name}.{_fmt_path(path)}: {problem}")
    return out


def _first_message(e: ValidationError, schema: type[BaseModel] | None = None) -> str:
    """Each error as `option: what` (an error of the options together, as `what`)."""
    parts = []
    for err in e.errors():
        loc = ".".join(map(str, err["loc"]))
        if not loc:  # the options' own check (info_vae: alpha + weight >= 1)
            parts.append(err["msg"].removeprefix("Value error, "))
        elif err["type"] == "extra_forbidden" and schema is not None:
            parts.append(f"{loc}: unknown option; allowed: {', '.join(schema.model_fields) or 'none'}")
        elif err["type"] == "missing":
            parts.append(f"{loc}: required")
        else:
            parts.append(f"{loc}: {_show(err['input'])}: {err['msg']}")
    return "; ".join(parts)


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
# Every metric a run can log under test/ and val/, and which ones need what (vaebench.evaluate's and
# vaebench.train's names: tests/test_evaluate.py checks these against what evaluations return).
TEST_METRICS = ("elbo", "bpd", "nll_iw", "nll_iw_k", "kl", "active_units", "recon_mse", "recon_bce",
                "noisy_recon_mse", "noisy_recon_bce", "kmeans_acc", "nmi", "ari", "silhouette", "knn_acc",
                "probe_acc", "codebook_perplexity", "dead_codes", "codebook_usage")
VAL_METRICS = ("loss", "recon", "kl", "neg_elbo")
# clustering.SCORE_KEYS (that module imports numpy; this one stays light)
CLUSTERING_METRICS = ("test/kmeans_acc", "test/nmi", "test/ari", "test/silhouette", "test/knn_acc", "test/probe_acc")
FAMILY_METRICS = {  # metric -> the only family that logs it
    "test/noisy_recon_mse": "dae", "test/noisy_recon_bce": "dae", "test/codebook_perplexity": "vq_vae",
    "test/dead_codes": "vq_vae", "test/codebook_usage": "vq_vae"}


def metric_problem(metric: str, families: set[str], clustering: bool) -> str | None:
    """Why `metric` (test/<name> or val/<name>) cannot be measured for runs of these families under
    this protocol; None when it can."""
    split, _, name = metric.partition("/")
    known = TEST_METRICS if split == "test" else VAL_METRICS
    if name not in known:
        return f"{metric!r} is not a metric vaebench logs; {split}/ metrics: {', '.join(known)}"
    if metric in CLUSTERING_METRICS and not clustering:
        return f"{metric} is not measured: evaluate.clustering is false"
    only = FAMILY_METRICS.get(metric)
    others = sorted(f for f in families if only is not None and f != only)
    if others:
        return f"{metric} is logged by {only} runs only, not by {', '.join(map(repr, others))}"
    return None


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


# The stores `tracking_uri` may name: SQLite (the default), the databases MLflow's SQL store takes
# (a SQLAlchemy driver may follow a `+`), an MLflow tracking server, Databricks.
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")
# The databases an Optuna RDB storage (SQLAlchemy) takes; a driver may follow a `+`.
STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "oracle")


def _url_scheme(url: str) -> str | None:
    """The database or protocol of a store URL, without its SQLAlchemy driver (`postgresql+psycopg`
    -> postgresql); None for a plain path."""
    return url.split("://", 1)[0].split("+", 1)[0].lower() if "://" in url else None


def _sqlite_slashes(url: str, word: str, file: str) -> str | None:
    """The message for a SQLite URL with too few slashes (`sqlite://x.db`), or None."""
    if _url_scheme(url) == "sqlite" and not url.startswith("sqlite:///"):
        return (f"a SQLite {word} has three slashes before a relative path (sqlite:///{file}), "
                f"four before an absolute one (sqlite:////data/{file})")
    return None


def storage_problem(url: str) -> str | None:
    """What is wrong with an Optuna storage URL (`tune.storage`, `--storage`), or None."""
    scheme = _url_scheme(url)
    example = "e.g. sqlite:///optuna.db (a file next to the experiments file) or postgresql://user@host/db"
    if scheme is None:
        return f"{url!r} is not an Optuna storage URL; {example}"
    if scheme not in STORAGE_SCHEMES:
        return f"{url!r}: unsupported scheme {scheme!r}; allowed: {', '.join(STORAGE_SCHEMES)}; {example}"
    slashes = _sqlite_slashes(url, "URL", "optuna.db")
    return f"{url!r}: {slashes}" if slashes else None


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

    @field_validator("tracking_uri")
    @classmethod
    def _tracking_uri(cls, v: str | None) -> str | None:
        if v is None:
            return v
        scheme = _url_scheme(v)
        example = ("e.g. sqlite:///mlruns.db (a file next to the experiments file) or http://host:5000 "
                   "(an MLflow server)")
        if scheme is None:
            raise ValueError(f"not a tracking URI; {example}. MLflow's folder store (a plain path) is "
                             "retired in MLflow 3")
        if scheme not in TRACKING_SCHEMES:
            raise ValueError(f"unsupported scheme {scheme!r}; allowed: {', '.join(TRACKING_SCHEMES)}; {example}")
        slashes = _sqlite_slashes(v, "URI", "mlruns.db")
        if slashes:
            raise ValueError(slashes)
        return v

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


