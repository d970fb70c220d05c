"""Where a study lives and how it searches: the sampler and pruner built from `tune:` (through the
registries of YAML names -> Optuna classes that the config schema owns), and the Optuna storage (its
URL, resolved next to the MLflow store by default, and opening it with heartbeats so dead trials get
failed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from vaebench.config import PRUNERS, SAMPLERS, Experiment, TuneSettings

if TYPE_CHECKING:
    from vaebench.tune.space import Dimension

HEARTBEAT_SECONDS = 30  # RDB storages: a trial whose process stopped beating for 2x this is failed


def quiet(fn: Callable[[], Any]) -> Any:
    """`fn()` without Optuna's ExperimentalWarning."""
    import warnings

    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return fn()


def make_sampler(tune: TuneSettings, dims: list[Dimension], seed: int | None) -> Any:
    import optuna

    kwargs = dict(tune.sampler_options)
    if tune.sampler == "grid":
        kwargs["search_space"] = {d.key: d.optuna_choices for d in dims}
    return quiet(lambda: getattr(optuna.samplers, SAMPLERS[tune.sampler])(seed=seed, **kwargs))


def make_pruner(tune: TuneSettings) -> Any:
    import optuna

    return getattr(optuna.pruners, PRUNERS[tune.pruner_name])(**tune.pruner_options)


def sampler_seed(seed: int | None, n_existing: int, worker: int) -> int | None:
    """The sampler's seed, derived from tune.seed, the trials already in the study and the worker:
    a resumed study (or a second worker) does not replay the same first suggestions."""
    if seed is None:
        return None
    import numpy as np

    return int(np.random.SeedSequence([seed, n_existing, worker]).generate_state(1)[0])


def resolved_storage(exp: Experiment) -> str:
    """`tune.storage` (relative sqlite paths are relative to the experiments file), else
    `optuna.db` next to the MLflow SQLite store (or next to the experiments file)."""
    url = exp.tune.storage if exp.tune is not None else None
    if url:
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            rel = url[len("sqlite:///"):]
            if rel != ":memory:":
                url = "sqlite:///" + str((exp.base_dir / rel).resolve())
        return url
    uri = exp.resolved_tracking_uri()
    folder = Path(uri[len("sqlite:///"):]).parent if uri.startswith("sqlite:///") and ":memory:" not in uri \
        else exp.base_dir
    return "sqlite:///" + str((folder / "optuna.db").resolve())


def study_files(exp: Experiment) -> dict[Path, str]:
    """The files a study lives in, which no output may replace: the experiments file, and the
    MLflow and Optuna stores where they are SQLite files."""
    files = {exp.path: "the experiments file"} if exp.path else {}
    for url, what in ((exp.resolved_tracking_uri(), "the study's MLflow store"),
                      (resolved_storage(exp), "the study's Optuna storage")):
        if url.startswith("sqlite:///") and ":memory:" not in url:
            files[Path(url[len("sqlite:///"):])] = what
    return files


def storage_display(url: str) -> str:
    """The storage URL without its password (it goes into MLflow tags and the console)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL: show it as given
        return url


class StorageUnavailable(RuntimeError):
    """The Optuna storage could not be opened (its server does not answer, its driver is missing)."""


def open_storage(url: str, on_stale: Callable | None = None) -> Any:
    """An RDB storage with heartbeats: a trial whose process died (on any machine) is failed by
    the next worker once its heartbeat is stale."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    engine_kwargs = None
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}  # several workers write to one file
    try:
        return quiet(lambda: optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_SECONDS,
            heartbeat_stale_trial_callback=on_stale))
    except ImportError as e:  # postgresql:// names psycopg2, which vaebench[cluster] does not install
        raise StorageUnavailable(
            f"cannot open the Optuna storage {storage_display(url)}: its database driver is missing ({e}); "
            "install it, or name one in the URL (postgresql+psycopg://... with vaebench[cluster])") from None
    except SQLAlchemyError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StorageUnavailable(
            f"cannot open the Optuna storage {storage_display(url)}: {first}; check that its database is "
            "running and reachable, and the URL (tune.storage, or --storage)") from None
