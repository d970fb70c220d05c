"""MLflow runs of one experiments file -> pandas tables (the report's only contact with MLflow).

What is read (see vaebench.tracking and vaebench.runner for what is written):

  cell runs    `vaebench.kind=cell`: one row per run key, its latest FINISHED run (a re-run with
               --force, or a failed attempt followed by a success, leaves several runs per key);
               keys whose runs never finished are listed separately with their error
  parent runs  `vaebench.kind=parent`: the machine (host, python, torch, cuda)
  studies      `vaebench.kind=study` (Optuna studies, with `optuna.study_name` / `optuna.storage`
               tags) and their `vaebench.kind=trial` child runs; the file's own Optuna storage is
               opened when the study run names it and it is reachable (parameter importances,
               objective names), else the trial runs' own metrics are used. No other storage a
               tag names is opened: nothing is fetched from a URL found in a run

Axis values come from the run's tags (the matrix axes, as `vaebench run` tags them) and fall back
to its params (every setting), so `dataset` shows even when it is not an axis. Columns of numbers
are converted to numbers (tags and params are strings in MLflow).
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vaebench import tracking

if TYPE_CHECKING:  # annotations only
    import pandas as pd

    from vaebench.config import Experiment

# The settings every run is identified by, in this order (the run-name order of vaebench.matrix),
# then any other axis of the file, then the seed.
CORE_AXES = ("dataset", "model", "arch", "latent_dim", "beta", "reduction")
# Figures of a run shown in the gallery (artifact names under figures/).
GALLERY = ("reconstructions.png", "samples.png", "latent_scatter.png")
# Per-epoch metrics drawn as overlaid learning curves (comparable across runs: nats per image).
CURVES = ("val/neg_elbo", "val/recon")
# The shared MLflow UI view written by `share_ui_view`: runs table with the axis columns.
UI_VIEW_KEY = "vaebench"
UI_VIEW_TAG = "mlflow.sharedViewState." + UI_VIEW_KEY
TAG_TRIAL_NUMBER = "vaebench.trial_number"
TAG_TRIAL_STATE = "vaebench.trial_state"
TAG_STUDY_NAME = "optuna.study_name"
TAG_STUDY_STORAGE = "optuna.storage"
MACHINE_TAGS = ("vaebench.host", "vaebench.python", "vaebench.torch", "vaebench.cuda")
SCATTER_COLOURS = 64  # big figures are re-encoded with this many colours (~4x smaller, same look)


@dataclass
class Study:
    """One Optuna study found in MLflow."""

    name: str
    run_id: str
    storage: str | None
    objectives: list[str]            # metric names, one per objective ("objective 0" when unknown)
    directions: list[str]            # "maximize" | "minimize", one per objective
    trials: pd.DataFrame             # number, state, run_id, value columns (objectives), param columns
    params: list[str]                # the searched parameters (columns of `trials`)
    importances: dict[str, dict[str, float]] = field(default_factory=dict)  # objective -> param -> share
    notes: list[str] = field(default_factory=list)  # what could not be read, for the report


@dataclass
class ReportData:
    """Everything the report shows, read once from MLflow."""

    name: str
    tracking_uri: str
    experiment_id: str | None
    ui_url: str | None               # an MLflow UI serving this store (http stores), else None
    runs: pd.DataFrame               # one row per run key: its latest finished run
    failed: pd.DataFrame             # run keys without a finished run: latest attempt + error
    axes: list[str]                  # axis columns of `runs` / `failed`, in display order
    matrix_axes: dict[str, list[Any]]  # the file's matrix (for the header)
    histories: dict[str, pd.DataFrame]  # run_id -> per-epoch CURVES (columns step + metrics)
    images: dict[str, dict[str, bytes]]  # run_id -> GALLERY file name -> PNG bytes
    machine: dict[str, list[str]]    # host/python/torch/cuda/device -> distinct values seen
    studies: list[Study]
    not_run: int                     # cells of the file's matrix without any run yet
    superseded_failures: int         # failed attempts of keys that also have a finished run
    outside_file: int                # run keys in MLflow that the file no longer has (not shown)
    started: float | None            # first run start (unix seconds)
    ended: float | None              # last run end
    generated: float = field(default_factory=time.time)
    references: pd.DataFrame | None = None  # the file's `reference:` entries beside our numbers (references())
    trashed: bool = False                # the experiment is in MLflow's trash: its runs are not read

    @property
    def seeds(self) -> int:
        return int(self.runs["seed"].nunique()) if "seed" in self.runs and len(self.runs) else 0

    def run_link(self, run_id: str) -> str | None:
        if not self.ui_url or not self.experiment_id:
            return None
        return f"{self.ui_url.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"

    def experiment_link(self, base: str | None = None) -> str | None:
        """The MLflow UI's runs table of this experiment with the shared axis-column view."""
        base = base or self.ui_url
        if not base or not self.experiment_id:
            return None
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs?viewStateShareKey={UI_VIEW_KEY}"


# --- reading -----------------------------------------------------------------------------------


def collect(exp: Experiment, *, images: bool = True) -> ReportData:
    """Read every run of `exp` from its tracking store. An experiment that does not exist yet (no
    `vaebench run` so far) gives empty tables, not an error."""
    from mlflow import MlflowClient

    uri = exp.resolved_tracking_uri()
    if uri.startswith(("http://", "https://")):
        tracking.check_server(uri)  # one clear error instead of MLflow's minutes of retries
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        client, found = None, None  # nothing logged yet (and opening the file would create it)
    else:
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(exp.name)
    experiment_id = found.experiment_id if found is not None and found.lifecycle_stage == "active" else None
    tracker = tracking.Tracker(client=client, experiment_id=experiment_id or "", uri=uri)
    all_runs = tracking.search(tracker) if experiment_id else []
    by_kind: dict[str, list[Any]] = {}
    for run in all_runs:
        by_kind.setdefault(run.data.tags.get(tracking.TAG_KIND, ""), []).append(run)

    latest, failed, superseded = _pick_latest(by_kind.get("cell", []))
    specs = _specs(exp)
    outside = 0
    if specs:  # the report is the file's: runs of cells it no longer has (edited since) stay out
        in_file = lambda r: r.data.tags.get(tracking.TAG_RUN_KEY) in specs  # noqa: E731
        outside = sum(not in_file(r) for r in [*latest, *failed])
        latest, failed = [r for r in latest if in_file(r)], [r for r in failed if in_file(r)]
    axes = _axis_order(exp, [*latest, *failed])
    runs_df = _runs_frame(latest, axes, specs)
    failed_df = _runs_frame(failed, axes, specs)
    histories = _histories(client, latest)
    pictures = _gallery_images(client, latest) if images else {}
    cell_runs = by_kind.get("cell", [])
    logged_keys = {r.data.tags.get(tracking.TAG_RUN_KEY) for r in cell_runs}
    starts = [r.info.start_time for r in all_runs if r.info.start_time]
    ends = [r.info.end_time for r in all_runs if r.info.end_time]
    return ReportData(
        name=exp.name, tracking_uri=public_uri(uri), experiment_id=experiment_id,
        ui_url=public_uri(tracker.ui_url, drop_user=True) if tracker.ui_url else None,
        runs=runs_df, failed=failed_df, axes=axes, matrix_axes=dict(exp.matrix), histories=histories,
        # a tuning study's run records its machine as a sweep's does; its trials, their device
        images=pictures, machine=_machine(by_kind.get("parent", []) + by_kind.get("study", []),
                                          cell_runs + by_kind.get("trial", [])),
        studies=[_study(client, run, by_kind.get("trial", []), exp) for run in
                 sorted(by_kind.get("study", []), key=lambda r: r.info.start_time or 0)],
        not_run=sum(key not in logged_keys for key in specs),
        superseded_failures=superseded, outside_file=outside,
        started=min(starts) / 1000 if starts else None, ended=max(ends) / 1000 if ends else None,
        references=references(exp, runs_df, specs),
        trashed=found is not None and found.lifecycle_stage == "deleted")


REFERENCE_COLUMNS = ("reference", "metric", "source", "where", "run_name", "run_id", "ours", "published",
                     "difference", "tolerance", "status")


def references(exp: Experiment, runs: pd.DataFrame, specs: dict[str, Any]) -> pd.DataFrame:
    """One row per `reference:` entry and finished run it selects: our value, the published one,
    the difference (ours - published) and a status: within / beyond the tolerance, no tolerance,
    not measured (the run has no such metric). An entry selecting several runs gets one more row,
    the mean over them (`run_name` "mean of N runs"); one whose cells have no finished run yet, a
    row saying so."""
    import math

    import pandas as pd

    from vaebench.matrix import matches

    def status(ours: float | None, ref: Any) -> str:
        if ours is None or math.isnan(ours):
            return "not measured"
        if ref.tolerance is None:
            return "no tolerance"
        return "within" if abs(ours - ref.value) <= ref.tolerance else "beyond"

    rows = []
    for i, ref in enumerate(exp.reference):
        where = ", ".join(f"{k}={v}" for k, v in ref.where.items()) or "every cell"
        base = {"reference": i, "metric": ref.metric, "source": ref.source, "where": where,
                "published": ref.value, "tolerance": ref.tolerance}
        chosen = runs[[key in specs and matches(specs[key], ref.where) for key in runs["run_key"]]] \
            if len(runs) else runs
        values = []
        for _, run in chosen.iterrows():
            ours = run.get(ref.metric)
            ours = None if ours is None or pd.isna(ours) else float(ours)
            values += [ours] if ours is not None else []
            rows.append({**base, "run_name": run["run_name"], "run_id": run["run_id"], "ours": ours,
                         "difference": None if ours is None else ours - ref.value, "status": status(ours, ref)})
        if len(chosen) > 1:
            mean = sum(values) / len(values) if values else None
            rows.append({**base, "run_name": f"mean of {len(values)} runs", "run_id": None, "ours": mean,
                         "difference": None if mean is None else mean - ref.value, "status": status(mean, ref)})
        elif not len(chosen):
            rows.append({**base, "run_name": None, "run_id": None, "ours": None, "difference": None,
                         "status": "not run yet"})
    return pd.DataFrame(rows, columns=list(REFERENCE_COLUMNS))


def public_uri(uri: str, drop_user: bool = False) -> str:
    """A store URI fit for a report that gets attached to messages: no password (nor user)."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(uri)
        if parts.password is None and not (drop_user and parts.username):
            return uri
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        user = "" if drop_user or not parts.username else f"{parts.username}:***@"
        return urlunsplit(parts._replace(netloc=f"{user}{host}{f':{parts.port}' if parts.port else ''}"))
    except ValueError:
        return uri


def _pick_latest(cells: list[Any]) -> tuple[list[Any], list[Any], int]:
    """(latest FINISHED run per key, latest attempt of keys that never finished, number of failed
    attempts hidden by a finished run of the same key)."""
    by_key: dict[str, list[Any]] = {}
    for run in cells:
        by_key.setdefault(run.data.tags.get(tracking.TAG_RUN_KEY, run.info.run_id), []).append(run)
    finished, failed, superseded = [], [], 0
    for runs in by_key.values():
        runs.sort(key=lambda r: r.info.start_time or 0, reverse=True)
        done = next((r for r in runs if r.info.status == "FINISHED"), None)
        if done is not None:
            finished.append(done)
            superseded += sum(r.info.status == "FAILED" for r in runs)
        else:
            failed.append(runs[0])
    order = lambda r: r.info.start_time or 0  # noqa: E731 - oldest first: the order they ran in
    return sorted(finished, key=order), sorted(failed, key=order), superseded


def _axis_order(exp: Experiment, runs: list[Any]) -> list[str]:
    """CORE_AXES, then the file's other axes (matrix, include), then any other axis tag found on the
    runs (a run logged by an earlier version of the file), then the seed."""
    from vaebench.config import SETTING_NAMES
    from vaebench.matrix import split_axis

    extra = [a for a in exp.matrix if split_axis(a)[0] not in CORE_AXES]
    extra += [k for entry in exp.include for k in entry if k != "seed" and split_axis(k)[0] not in CORE_AXES]
    for run in runs:
        extra += [t for t in run.data.tags if t != "seed" and split_axis(t)[0] in SETTING_NAMES
                  and split_axis(t)[0] not in CORE_AXES]
    return [*CORE_AXES, *dict.fromkeys(extra), "seed"]


def _specs(exp: Experiment) -> dict[str, Any]:
    """The file's cells by run key (an empty dict when the file no longer expands)."""
    from vaebench.matrix import MatrixError, expand

    try:
        return {spec.key: spec for spec in expand(exp)}
    except MatrixError:
        return {}


def _runs_frame(runs: list[Any], axes: list[str], specs: dict[str, Any]) -> pd.DataFrame:
    """One row per run. An axis value comes from the run's tags, else its params, else (a run that
    failed before logging its params) from the file's cell of the same run key."""
    import pandas as pd

    from vaebench.matrix import flatten

    rows = []
    for run in runs:
        tags, params = run.data.tags, run.data.params
        spec = specs.get(tags.get(tracking.TAG_RUN_KEY, ""))
        known = {**flatten(spec.settings.model_dump(mode="json")), **spec.axes} if spec else {}
        row: dict[str, Any] = {
            "run_name": tags.get("mlflow.runName") or run.info.run_name or run.info.run_id,
            "run_id": run.info.run_id, "run_key": tags.get(tracking.TAG_RUN_KEY, ""),
            "status": run.info.status,
            "start_time": (run.info.start_time or 0) / 1000 or None,
            "end_time": (run.info.end_time or 0) / 1000 or None,
            "error": tags.get(tracking.TAG_ERROR, "interrupted (rerun to resume)"
                              if run.info.status in ("KILLED", "RUNNING") else ""),
            "device": tags.get("vaebench.device", ""),
            "not_applicable": tags.get(tracking.TAG_NOT_APPLICABLE, ""),
            "artifact_uri": run.info.artifact_uri,
        }
        for axis in axes:
            value = tags.get(axis, params.get(axis))
            if value is None and (axis in CORE_AXES or axis == "seed" or (spec and axis in spec.axes)):
                value = known.get(axis)
            if isinstance(value, (dict, list)):  # as `vaebench run` writes it into a tag
                import yaml

                value = yaml.safe_dump(value, default_flow_style=True).strip()
            row[axis] = value if value not in (None, "None") else None
        row.update(run.data.metrics)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=None if rows else [
        "run_name", "run_id", "run_key", "status", "start_time", "end_time", "error", "device",
        "not_applicable", "artifact_uri", *axes])
    for axis in axes:
        frame[axis] = _typed(frame[axis]) if axis in frame else None
    return frame


def _typed(values: pd.Series) -> pd.Series:
    """Strings from MLflow -> ints or floats when every value is one (for sorting and plotting)."""
    import pandas as pd

    present = values.dropna()
    if present.empty:
        return values.astype(object)
    for kind in (int, float):
        try:
            converted = present.map(lambda v: kind(str(v)))
        except (TypeError, ValueError):
            continue
        out = pd.Series([None] * len(values), index=values.index, dtype="float64" if kind is float else object)
        out[present.index] = converted
        if kind is int:
            out = out.astype("Int64") if values.isna().any() else out.astype("int64")
        return out
    return values.astype(object)


def _histories(client: Any, runs: list[Any]) -> dict[str, pd.DataFrame]:
    import pandas as pd

    wanted = [(r.info.run_id, k) for r in runs for k in CURVES if k in r.data.metrics]
    histories: dict[str, dict[str, dict[int, float]]] = {}

    def fetch(item: tuple[str, str]) -> tuple[str, str, list[Any]]:
        return item[0], item[1], client.get_metric_history(item[0], item[1])

    for run_id, key, points in _threaded(fetch, wanted):
        series = histories.setdefault(run_id, {}).setdefault(key, {})
        for m in points:
            series[int(m.step)] = m.value  # the last value logged for a step wins (resumed runs)
    return {run_id: pd.DataFrame(series).rename_axis("step").reset_index()
            for run_id, series in histories.items()}


def _gallery_images(client: Any, runs: list[Any]) -> dict[str, dict[str, bytes]]:
    def fetch(run: Any) -> tuple[str, dict[str, bytes]]:
        return run.info.run_id, {name: _shrink(data) for name, data in _read_figures(client, run).items()}

    return {run_id: found for run_id, found in _threaded(fetch, runs) if found}


def _read_figures(client: Any, run: Any) -> dict[str, bytes]:
    """GALLERY images of a run: read in place from a local store, else downloaded."""
    root = run.info.artifact_uri or ""
    if root.startswith("file:"):
        from mlflow.utils.file_utils import local_file_uri_to_path

        folder = Path(local_file_uri_to_path(root)) / "figures"
        return {n: (folder / n).read_bytes() for n in GALLERY if (folder / n).is_file()}
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = Path(client.download_artifacts(run.info.run_id, "figures", tmp))
        except (MlflowException, OSError):
            return {}
        return {n: (folder / n).read_bytes() for n in GALLERY if (folder / n).is_file()}


def _shrink(png: bytes, limit: int = 30_000) -> bytes:
    """Big figures (the latent scatter, ~60 kB) re-encoded with a 64-colour palette: a quarter of
    the size and indistinguishable at report size. Undecodable bytes are returned as they are (the
    report then shows the image as missing rather than failing)."""
    if len(png) <= limit:
        return png
    try:
        from PIL import Image

        with Image.open(io.BytesIO(png)) as im:
            small = im.convert("RGB").quantize(colors=SCATTER_COLOURS, method=Image.Quantize.FASTOCTREE)
            out = io.BytesIO()
            small.save(out, format="PNG")
        return out.getvalue() if out.tell() < len(png) else png
    except Exception:  # noqa: BLE001 - a damaged artifact must not stop the report
        return png


def _threaded(fn, items: list[Any]) -> list[Any]:
    """fn over items with a few threads (MLflow calls and file reads wait on I/O)."""
    if len(items) < 8:
        return [fn(i) for i in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        return list(pool.map(fn, items))


def _machine(parents: list[Any], cells: list[Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for run in sorted(parents, key=lambda r: r.info.start_time or 0, reverse=True):
        for tag in MACHINE_TAGS:
            value = run.data.tags.get(tag)
            if value and value not in out.setdefault(tag.split(".")[1], []):
                out[tag.split(".")[1]].append(value)
    for tag, key in (("vaebench.device", "device"), ("vaebench.float32", "float32 math")):
        counts: dict[str, int] = {}
        for run in cells:
            value = run.data.tags.get(tag)
            if value:
                counts[value] = counts.get(value, 0) + 1
        if counts:
            out[key] = [f"{v} ({n} runs)" for v, n in sorted(counts.items(), key=lambda x: -x[1])]
    training = _training(cells)
    if training:
        out["training"] = training
    return out


STEP_NAMES = {"cuda-graph": "captured in a CUDA graph", "eager": "eager"}


def _training(cells: list[Any]) -> list[str]:
    """How the runs were trained, from the tags the trainers write (vaebench.units): packed with
    others or alone, the step captured or eager, and why a capture fell back."""
    ways: dict[str, int] = {}
    packs: dict[str, set[str]] = {}
    fallbacks: dict[str, int] = {}
    for run in cells:
        tags = run.data.tags
        if "vaebench.engine" not in tags:  # runs of an older vaebench
            continue
        step = STEP_NAMES.get(tags.get("vaebench.step", ""), tags.get("vaebench.step", "?"))
        packed = tags.get("vaebench.pack.id") and (_int(tags.get("vaebench.pack.size")) or 1) > 1
        way = f"packed, {step}" if packed else f"alone, {step}"
        ways[way] = ways.get(way, 0) + 1
        if packed:
            packs.setdefault(way, set()).add(tags["vaebench.pack.id"])
        if tags.get("vaebench.step.fallback"):
            fallbacks[tags["vaebench.step.fallback"]] = fallbacks.get(tags["vaebench.step.fallback"], 0) + 1
    out = [f"{n} runs {way}" + (f" (in {len(packs[way])} pack{'s' * (len(packs[way]) > 1)})" if way in packs else "")
           for way, n in sorted(ways.items(), key=lambda x: -x[1])]
    return out + [f"{n} runs: {why}" for why, n in fallbacks.items()]


# --- Optuna studies ----------------------------------------------------------------------------


def _study(client: Any, run: Any, trial_runs: list[Any], exp: Experiment) -> Study:
    import pandas as pd

    tags = run.data.tags
    name = tags.get(TAG_STUDY_NAME) or run.info.run_name or run.info.run_id
    storage = tags.get(TAG_STUDY_STORAGE) or None
    notes: list[str] = []
    optuna_study = _load_optuna(name, _file_storage(storage, exp, notes), notes)
    objectives, directions = _objectives(optuna_study, tags, exp)

    mine = [r for r in trial_runs if r.data.tags.get(tracking.TAG_PARENT) == run.info.run_id]
    rows: dict[int, dict[str, Any]] = {}
    for r in mine:
        number = _int(r.data.tags.get(TAG_TRIAL_NUMBER))
        if number is None:
            continue
        wall = (r.info.end_time - r.info.start_time) / 1000 if r.info.end_time and r.info.start_time else None
        row = {"number": number, "run_id": r.info.run_id, "run_name": r.info.run_name,
               "state": (r.data.tags.get(TAG_TRIAL_STATE) or _state_of(r.info.status)).upper(),
               "train_seconds": r.data.metrics.get("train/seconds"), "wall_seconds": wall}
        row.update({f"value {i}": r.data.metrics.get(m) for i, m in enumerate(objectives)})
        row.update({f"param {k}": v for k, v in r.data.params.items()})
        rows[number] = row
    searched: list[str] = []
    if optuna_study is not None:
        try:
            for t in optuna_study.get_trials(deepcopy=False):
                row = rows.setdefault(t.number, {"number": t.number, "run_id": None, "run_name": None})
                row["state"] = t.state.name
                for i, v in enumerate(t.values or []):
                    row[f"value {i}"] = v
                row.update({f"param {k}": v for k, v in t.params.items()})
                searched += [k for k in t.params if k not in searched]
        except Exception as e:  # noqa: BLE001 - a broken storage only costs the details
            notes.append(f"could not read the trials from the Optuna storage: {type(e).__name__}: {e}")
    for row in rows.values():  # a pruned trial's value in Optuna is the pruned metric's last step,
        if row.get("state") != "COMPLETE":  # not the objective: only a complete trial has one
            row.update({f"value {i}": None for i in range(len(objectives))})
    if not searched:
        searched = _searched_params(exp, rows.values())
    trials = pd.DataFrame(sorted(rows.values(), key=lambda r: r["number"]))
    for i in range(len(objectives)):
        column = f"value {i}"
        trials[column] = pd.to_numeric(trials[column], errors="coerce") if column in trials else float("nan")
    for p in searched:
        if f"param {p}" in trials:
            trials[f"param {p}"] = _typed(trials[f"param {p}"])
    keep = ["number", "run_id", "run_name", "state", "train_seconds", "wall_seconds",
            *(f"value {i}" for i in range(len(objectives))),
            *(f"param {p}" for p in searched if f"param {p}" in trials)]
    trials = trials.reindex(columns=keep)
    study = Study(name=name, run_id=run.info.run_id, storage=public_uri(storage) if storage else None,
                  objectives=objectives,
                  directions=directions, trials=trials, params=[p for p in searched if f"param {p}" in trials],
                  notes=notes)
    if optuna_study is not None:
        study.importances = _importances(optuna_study, objectives, directions, notes)
    elif storage is None:
        notes.append("parameter importances need the Optuna storage; the study run has no "
                     f"`{TAG_STUDY_STORAGE}` tag")
    return study


def _file_storage(tagged: str | None, exp: Experiment, notes: list[str]) -> str | None:
    """The Optuna storage to open for a study run: the experiments file's own (`tune.storage`, else
    optuna.db next to the MLflow store, as `vaebench tune` resolves it) when the run's
    `optuna.storage` tag names it. Never the URL in the tag itself: a tag is data, and the report
    connects to nothing that data names (a database server, another SQLite file)."""
    if not tagged:
        return None
    from vaebench.config import TuneSettings
    from vaebench.tune.storage import resolved_storage, storage_display

    tune = exp.tune if exp.tune is not None else TuneSettings.model_construct()  # no `tune:`: the default
    own = resolved_storage(exp.model_copy(update={"tune": tune}))
    if tagged in (own, storage_display(own)):
        return own  # with its password, which the tag does not hold
    notes.append(f"the Optuna storage could not be opened: the study run names {public_uri(tagged)}, which is "
                 f"not this file's storage ({storage_display(own)}), and the report opens no storage a run "
                 "names; the history below comes from the trial runs in MLflow")
    return None


def _load_optuna(name: str, storage: str | None, notes: list[str]) -> Any | None:
    if not storage:
        return None
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # Never create a database as a side effect of reading one.
        if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).exists():
            raise FileNotFoundError(storage[len("sqlite:///"):])
        return optuna.load_study(study_name=name, storage=storage)
    except Exception as e:  # noqa: BLE001 - unreachable storage: fall back to the MLflow runs
        notes.append(f"the Optuna storage could not be opened ({type(e).__name__}: {e}); "
                     "the history below comes from the trial runs in MLflow")
        return None


def _objectives(optuna_study: Any | None, tags: dict[str, str], exp: Experiment) -> tuple[list[str], list[str]]:
    """Objective metric names and directions: from the Optuna study when open, else from the
    study run's tags, else from the file's `tune` section."""
    tune = exp.tune
    get = (lambda k: tune.get(k)) if isinstance(tune, dict) else (lambda k: getattr(tune, k, None))
    names = (_split(tags.get("vaebench.metrics") or tags.get("vaebench.metric"))
             or _listed(get("metrics")) or _listed(get("metric")))
    directions = (_split(tags.get("vaebench.directions") or tags.get("vaebench.direction"))
                  or _listed(get("directions")) or _listed(get("direction")))
    if optuna_study is not None:
        try:
            directions = [d.name.lower() for d in optuna_study.directions]
            names = list(optuna_study.metric_names or []) or names
        except Exception:  # noqa: BLE001
            pass
    n = max(len(names), len(directions), 1)
    names = (names + [f"objective {i}" for i in range(len(names), n)])[:n]
    directions = [str(d).lower() for d in directions]
    directions = (directions + [directions[-1] if directions else "minimize"] * n)[:n]
    return names, directions


def _importances(study: Any, objectives: list[str], directions: list[str],
                 notes: list[str]) -> dict[str, dict[str, float]]:
    import warnings

    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < 2:
        notes.append("parameter importances need at least 2 complete trials")
        return {}
    out = {}
    for i, name in enumerate(objectives):
        try:
            target = None
            if len(objectives) > 1:  # the evaluator looks for low target values
                sign = -1.0 if directions[i] == "maximize" else 1.0
                target = lambda t, i=i, sign=sign: sign * t.values[i]  # noqa: E731
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[name] = dict(optuna.importance.get_param_importances(study, target=target))
        except Exception as e:  # noqa: BLE001 - e.g. a single distinct value per parameter
            notes.append(f"parameter importances for {name} could not be computed: {type(e).__name__}: {e}")
    return out


def _searched_params(exp: Experiment, rows: Any) -> list[str]:
    tune = exp.tune
    space = tune.get("space") if isinstance(tune, dict) else getattr(tune, "space", None)
    rows = list(rows)
    if space:
        return [k for k in space if any(f"param {k}" in r for r in rows)]
    # no space known: the params that differ between trials
    keys = dict.fromkeys(k[6:] for r in rows for k in r if k.startswith("param "))
    return [k for k in keys if len({str(r.get(f"param {k}")) for r in rows}) > 1]


def _state_of(status: str) -> str:
    return {"FINISHED": "COMPLETE", "FAILED": "FAIL", "RUNNING": "RUNNING", "KILLED": "FAIL"}.get(status, status)


def _split(text: str | None) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else []


def _listed(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _int(text: str | None) -> int | None:
    try:
        return int(str(text))
    except (TypeError, ValueError):
        return None


# --- the MLflow UI ------------------------------------------------------------------------------


def share_ui_view(exp: Experiment, axes: list[str], metrics: list[str]) -> bool:
    """Store a shared view of the experiment's runs table in MLflow (an experiment tag the MLflow UI
    reads for `?viewStateShareKey=vaebench`): cell runs only, grouped flat (nested runs would
    otherwise hide under their parent), with the axis values and main metrics as columns. Returns
    False when the store cannot be written (the report does not need it)."""
    import json

    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=exp.resolved_tracking_uri())
        found = client.get_experiment_by_name(exp.name)
        if found is None or found.lifecycle_stage != "active":
            return False
        state = {
            "selectedColumns": [*(f"tags.`{a}`" for a in axes), *(f"metrics.`{m}`" for m in metrics)],
            "searchFilter": f"tags.`{tracking.TAG_KIND}` = 'cell'",
            "groupBy": {"aggregateFunction": "average",
                        "groupByKeys": [{"mode": "tag", "groupByData": tracking.TAG_KIND}]},
            "runsHiddenMode": "SHOW_ALL",
        }
        text = json.dumps(state)
        if found.tags.get(UI_VIEW_TAG) != text:
            client.set_experiment_tag(found.experiment_id, UI_VIEW_TAG, text)
        return True
    except Exception:  # noqa: BLE001 - read-only store, server down: the report does not need it
        return False
