"""Everything MLflow: the experiment, parent and child runs, names, tags, checkpoints, and the
lookup of finished runs.

One MLflow experiment per experiments file (its `name`); one parent run per `vaebench run`
invocation; one child run per matrix cell, tagged with its axis values and run key. Every call
goes through an explicit `MlflowClient`, so nothing depends on MLflow's global active-run state.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

TAG_RUN_KEY = "vaebench.run_key"
TAG_KIND = "vaebench.kind"  # parent | cell | study | trial
TAG_VERSION = "vaebench.version"
TAG_SOURCE = "vaebench.dataset_source"
TAG_ERROR = "vaebench.error"
TAG_NOT_APPLICABLE = "vaebench.not_applicable"
TAG_PARENT = "mlflow.parentRunId"
CHECKPOINT_PATH = "checkpoints/last.pt"
MODEL_PATH = "model/model.pt"


@dataclass
class Tracker:
    client: Any  # mlflow.MlflowClient
    experiment_id: str
    uri: str

    @property
    def ui_url(self) -> str | None:
        return self.uri if self.uri.startswith(("http://", "https://")) else None


def default_artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts go next to the database file (MLflow's own default is
    ./mlruns relative to whatever the working directory happens to be)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


class TrackingUnavailable(RuntimeError):
    pass


def check_server(uri: str, timeout: float = 10.0) -> None:
    """Fail fast when a tracking server does not answer: MLflow's own client retries with
    back-off for minutes before it gives up."""
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            r.read()
    except OSError as e:
        raise TrackingUnavailable(f"the MLflow tracking server {uri} does not answer ({e}); start it, "
                                  f"or unset MLFLOW_TRACKING_URI / tracking_uri to use a local SQLite file") from None


def connect(uri: str, experiment_name: str) -> Tracker:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if uri.startswith(("http://", "https://")):
        check_server(uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        try:
            exp_id = client.create_experiment(experiment_name, default_artifact_location(uri))
        except MlflowException:  # created meanwhile by a parallel worker
            exp_id = client.get_experiment_by_name(experiment_name).experiment_id
    elif exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
        exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    return Tracker(client=client, experiment_id=exp_id, uri=uri)


def runs_by_key(tracker: Tracker) -> dict[str, list[Any]]:
    """All cell runs of the experiment grouped by run key, newest first."""
    out: dict[str, list[Any]] = {}
    for run in search(tracker, f"tags.`{TAG_KIND}` = 'cell'"):
        out.setdefault(run.data.tags.get(TAG_RUN_KEY, ""), []).append(run)
    for runs in out.values():
        runs.sort(key=lambda r: r.info.start_time or 0, reverse=True)
    return out


def search(tracker: Tracker, filter_string: str = "") -> list[Any]:
    runs, token = [], None
    while True:
        page = tracker.client.search_runs([tracker.experiment_id], filter_string, max_results=1000,
                                          page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def start_run(tracker: Tracker, name: str, tags: dict[str, Any], parent_id: str | None = None) -> str:
    from vaebench import __version__

    tags = {**tags, TAG_VERSION: __version__}
    if parent_id:
        tags[TAG_PARENT] = parent_id
    run = tracker.client.create_run(tracker.experiment_id, run_name=name,
                                    tags={k: str(v) for k, v in tags.items()})
    return run.info.run_id


def machine_tags() -> dict[str, str]:
    import torch

    return {"vaebench.host": platform.node(), "vaebench.python": platform.python_version(),
            "vaebench.torch": torch.__version__,
            "vaebench.cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}


def log_params(tracker: Tracker, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        tracker.client.log_batch(run_id, params=items[i:i + 100])


def log_metrics(tracker: Tracker, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):
        tracker.client.log_batch(run_id, metrics=items[i:i + 1000])


def logged_steps(tracker: Tracker, run_id: str, key: str) -> set[int]:
    return {m.step for m in tracker.client.get_metric_history(run_id, key)}


def tag_value(v: Any) -> str:
    """An axis value as a tag: lists and dicts in YAML flow style (`[64, 128]`), the rest as str()."""
    import yaml

    return yaml.safe_dump(v, default_flow_style=True).strip() if isinstance(v, (dict, list)) else str(v)


def set_tags(tracker: Tracker, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    tracker.client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def finish(tracker: Tracker, run_id: str, status: str = "FINISHED") -> None:
    tracker.client.set_terminated(run_id, status)


def log_file(tracker: Tracker, run_id: str, artifact_path: str, write) -> None:
    """Write one artifact through a temp file: `write(path)` fills it, then it is uploaded to
    `artifact_path` (a folder/name inside the run's artifacts)."""
    folder, name = os.path.split(artifact_path)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        write(path)
        tracker.client.log_artifact(run_id, path, folder or None)


def log_json(tracker: Tracker, run_id: str, artifact_path: str, data: Any) -> None:
    log_text(tracker, run_id, artifact_path, json.dumps(data, indent=2))


def log_text(tracker: Tracker, run_id: str, artifact_path: str, text: str) -> None:
    log_file(tracker, run_id, artifact_path, lambda p: Path(p).write_text(text))


def log_torch(tracker: Tracker, run_id: str, artifact_path: str, obj: Any) -> None:
    import torch

    log_file(tracker, run_id, artifact_path, lambda p: torch.save(obj, p))


class UnsafeArtifact(RuntimeError):
    """A torch artifact that holds more than tensors and plain containers (a pickled object, code to
    run) or is no pickle at all: refused, never executed."""


def load_torch(tracker: Tracker, run_id: str, artifact_path: str) -> Any | None:
    """Load a torch artifact with weights_only=True (plain tensors and containers only);
    None when the run has no such artifact; UnsafeArtifact (one line) when it holds anything else."""
    from mlflow.exceptions import MlflowException

    root = tracker.client.get_run(run_id).info.artifact_uri
    if root.startswith("file:"):  # a local store: read in place (no copy, no progress bar)
        from mlflow.utils.file_utils import local_file_uri_to_path

        path = os.path.join(local_file_uri_to_path(root), artifact_path)
        return _torch_load(path, run_id, artifact_path) if os.path.exists(path) else None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = tracker.client.download_artifacts(run_id, artifact_path, tmp)
        except (MlflowException, OSError):
            return None
        return _torch_load(path, run_id, artifact_path) if os.path.exists(path) else None


def _torch_load(path: str, run_id: str, artifact_path: str) -> Any:
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's text is a page that ends in advice to load with weights_only=False (which would run
        # whatever the file holds): keep only what it found, on one line
        found = [line.strip().removeprefix("WeightsUnpickler error:").strip() for line in str(e).splitlines()]
        found = [line for line in found if line and "weights_only" not in line and "Weights only" not in line
                 and not line.startswith(("Check the documentation", "Please file an issue"))]
        detail = " ".join(found)[:300] or "not a file of tensors"
        raise UnsafeArtifact(f"{artifact_path} of run {run_id} was refused, not loaded: {detail} (vaebench loads "
                             "only tensors and plain containers from artifacts, never code)") from None


class Background:
    """One thread that makes tracking calls in the order they are submitted, so that a trainer
    never waits for the store (per-epoch metrics, checkpoints, the final status). `flush()` waits
    for everything submitted so far and raises the first error any call hit; so does `close()`."""

    def __init__(self) -> None:
        import queue
        import threading

        self._queue: Any = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="vaebench-tracking", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                fn, args = item
                if self._error is None:  # after a failure, later calls are dropped: flush() reports it
                    fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the submitting thread by flush()
                self._error = e
            finally:
                self._queue.task_done()

    def submit(self, fn: Any, *args: Any) -> None:
        self._queue.put((fn, args))

    def flush(self) -> None:
        self._queue.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def metric_columns(runs: Iterable[Any]) -> list[str]:
    return sorted({k for r in runs for k in r.data.metrics})
