"""Everything MLflow: the experiment, parent and child runs, names, tags, checkpoints, and the
lookup of finished runs.

One MLflow experiment per experiments file (its `name`); one parent run per `vaebench run`
invocation; one child run per matrix cell, tagged with its axis values and run key. Every call
goes through an explicit `MlflowClient`, so nothing depends on MLflow's global active-run state.

A store that fails:

- Every call to the store is retried with back-off while the store is only temporarily
  unavailable (a SQLite file locked by another writer, a tracking server that does not answer or
  answers 5xx), for up to VAEBENCH_STORE_PATIENCE seconds (default 300) from the first failure;
  then it raises `StoreUnavailable`, one line that names the store. This comes on top of MLflow's
  own retries (its HTTP client backs off for minutes before it raises, SQLite waits 20 s for a lock).
  Errors that waiting does not cure (a read-only store, a full disk) are raised at once.
- Calls are repeated whole, so each must be safe to repeat: metrics carry their timestamp from
  the first attempt (MLflow ignores an identical metric logged twice), tags and params are
  idempotent, an artifact upload overwrites. Only `create_run` could duplicate (a request that
  reached the server but whose answer was lost): it is repeated only when the request cannot
  have been applied (no connection, a locked database).
- torch artifacts (the checkpoint, the final model) are written whole or not at all: on a local
  artifact store into a temporary file in the destination folder, fsynced, then renamed over the
  old one (POSIX rename is atomic); on a remote one uploaded by MLflow. Either way the sha256 and
  size of what was written is recorded in a run tag *before* the file (with the previous one's),
  and a reader checks the file against it: a file cut short, overwritten, or torn by a crash mid
  upload is `ArtifactDamaged`, never loaded as if whole.

Owns: the MLflow client and its retries, run and artifact I/O. Never touches: what the runs mean
(vaebench.units, vaebench.results), which runner trains what (vaebench.claims).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import platform
import random
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

TAG_RUN_KEY = "vaebench.run_key"
TAG_KIND = "vaebench.kind"  # parent | cell | study | trial
TAG_VERSION = "vaebench.version"
TAG_SOURCE = "vaebench.dataset_source"
TAG_ERROR = "vaebench.error"
TAG_FAILURE = "vaebench.failure"  # why a run failed, as a class (vaebench.attempts)
TAG_NOT_APPLICABLE = "vaebench.not_applicable"
TAG_PARENT = "mlflow.parentRunId"
CHECKPOINT_PATH = "checkpoints/last.pt"
MODEL_PATH = "model/model.pt"
# artifact -> the run tag holding "<sha256>:<bytes>" of its current and previous version
DIGEST_TAGS = {CHECKPOINT_PATH: "vaebench.checkpoint.sha256", MODEL_PATH: "vaebench.model.sha256"}

ENV_STORE_PATIENCE = "VAEBENCH_STORE_PATIENCE"
STORE_PATIENCE_S = 300.0  # how long a temporarily unavailable store is waited for, from its first failure
BACKOFF_S = (0.5, 30.0)  # first and longest pause between two attempts (doubling, with jitter)


@dataclass
class Tracker:
    client: Any  # mlflow.MlflowClient (wrapped in RetryingClient by `connect`)
    experiment_id: str
    uri: str
    # per run id: its artifact root and the digest of the checkpoint it holds (this process's view)
    roots: dict[str, str] = field(default_factory=dict, repr=False)
    digests: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)

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


class StoreUnavailable(RuntimeError):
    """The tracking store stayed unavailable (locked, not answering) for longer than the patience."""


class ArtifactDamaged(RuntimeError):
    """A torch artifact that does not match what was written (cut short, overwritten) or does not load."""


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


# --- a store that fails for a while ------------------------------------------------------------


def first_line(error: BaseException | str, limit: int = 300) -> str:
    """An error as one line (SQLAlchemy appends the SQL and a link on further lines, and may put a
    note about autoflush first)."""
    text = [t for t in str(error).strip().splitlines() if t.strip()]
    while len(text) > 1 and text[0].startswith("(raised as a result of"):
        text = text[1:]
    line = text[0] if text else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."


_LOCKED = ("database is locked", "database table is locked", "database is busy")
_UNSENT = ("Failed to establish a new connection", "Connection refused", "NewConnectionError")


def transient(error: BaseException) -> bool:
    """An error that waiting may cure: a locked SQLite file, a server that does not answer (or
    answers 502/503/504/429). Not: a read-only store, a full disk, a bad request."""
    text = str(error)
    if any(s in text for s in _LOCKED):
        return True
    try:
        import requests

        if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
    except ImportError:  # pragma: no cover - mlflow depends on requests
        pass
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    code = getattr(error, "error_code", None)
    if code == "TEMPORARILY_UNAVAILABLE":
        return True
    if "API request to" in text and ("failed with exception" in text or "failed with timeout" in text
                                     or any(f"error code {c}" in text for c in (429, 500, 502, 503, 504))):
        return True
    return False


def _unsent(error: BaseException) -> bool:
    """The request cannot have been applied: no connection was made, or the database refused it."""
    text = str(error)
    return any(s in text for s in _LOCKED + _UNSENT)


def store_patience() -> float:
    value = os.environ.get(ENV_STORE_PATIENCE)
    try:
        return float(value) if value else STORE_PATIENCE_S
    except ValueError:
        return STORE_PATIENCE_S


def retry(fn: Callable[[], Any], what: str, uri: str, *, repeatable: bool = True,
          patience: float | None = None) -> Any:
    """`fn()`, again after a pause (doubling, with jitter) while it fails with a transient error,
    until `patience` seconds have passed since the first failure; then StoreUnavailable."""
    patience = store_patience() if patience is None else patience
    first: float | None = None
    pause = BACKOFF_S[0]
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - sorted below
            if not transient(e) or (not repeatable and not _unsent(e)):
                raise
            now = time.monotonic()
            first = now if first is None else first
            if now - first >= patience:
                state = "stayed locked" if any(s in str(e) for s in _LOCKED) else "did not answer"
                raise StoreUnavailable(f"the tracking store {uri} {state} for {now - first:.0f}s "
                                       f"({what}: {first_line(e, 200)})") from None
            time.sleep(min(pause * random.uniform(0.5, 1.0), max(0.0, first + patience - now)))
            pause = min(pause * 2, BACKOFF_S[1])


class RetryingClient:
    """An MlflowClient whose every method goes through `retry` (module docstring)."""

    NOT_REPEATABLE = frozenset({"create_run"})

    def __init__(self, client: Any, uri: str):
        self._client, self._uri = client, uri

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # copy/pickle probes, and _client itself before __init__
            raise AttributeError(name)
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        repeatable = name not in self.NOT_REPEATABLE

        def call(*args: Any, **kwargs: Any) -> Any:
            return retry(lambda: attr(*args, **kwargs), name, self._uri, repeatable=repeatable)

        return call


class _QuietRetried(logging.Filter):
    """MLflow logs every SQLAlchemy error with its traceback before raising it. The ones the retry
    layer waits out (a locked database) or reports itself in one line are dropped from that one
    logger, as are its two lines about creating a new store's tables (they came before a sweep's
    first line); nothing else is."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not msg.startswith(("SQLAlchemy database error", "SQLAlchemy engine could not be created",
                                   "Creating initial MLflow database tables", "Updating database tables"))


_FILTERED = False


def _quiet_mlflow_db_errors() -> None:
    global _FILTERED
    if not _FILTERED:
        logging.getLogger("mlflow.store.db.utils").addFilter(_QuietRetried())
        _FILTERED = True


def connect(uri: str, experiment_name: str, echo: Callable[[str], None] | None = None) -> Tracker:
    """The experiment's tracker, the experiment created when missing, and restored (said through
    `echo`, when given) when it was deleted in MLflow: its runs then count as done."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if uri.startswith(("http://", "https://")):
        check_server(uri)
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        folder.mkdir(parents=True, exist_ok=True)
        _quiet_mlflow_db_errors()
        # MLflow creates a new database's tables on first use, and two processes doing it at once
        # collide ("duplicate column name"): one at a time on this machine (SQLite is local)
        with _folder_lock(folder):
            client = RetryingClient(retry(lambda: MlflowClient(tracking_uri=uri), "open", uri), uri)
            exp = client.get_experiment_by_name(experiment_name)
    else:
        client = RetryingClient(MlflowClient(tracking_uri=uri), uri)
        exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        try:
            exp_id = client.create_experiment(experiment_name, default_artifact_location(uri))
        except MlflowException:  # created meanwhile by a parallel worker
            exp_id = client.get_experiment_by_name(experiment_name).experiment_id
    elif exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
        exp_id = exp.experiment_id
        if echo is not None:
            echo(f"experiment {experiment_name!r} had been deleted in MLflow (it was in the trash): restored, "
                 f"with its runs, which count as done; to start over, give the study another `name` or use --force")
    else:
        exp_id = exp.experiment_id
    return Tracker(client=client, experiment_id=exp_id, uri=uri)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on a folder (POSIX; elsewhere, nothing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# --- runs ----------------------------------------------------------------------------------------


def runs_by_key(tracker: Tracker, key: str | None = None) -> dict[str, list[Any]]:
    """All cell runs of the experiment (of one run key) grouped by run key, newest first."""
    where = f"tags.`{TAG_KIND}` = 'cell'" + (f" and tags.`{TAG_RUN_KEY}` = '{key}'" if key else "")
    out: dict[str, list[Any]] = {}
    for run in search(tracker, where):
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
    tracker.roots[run.info.run_id] = run.info.artifact_uri
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
    now = int(time.time() * 1000)  # once: a retried batch is the same batch
    log_epochs(tracker, run_id, [(step, metrics, now)])


def log_epochs(tracker: Tracker, run_id: str, epochs: list[tuple[int, dict[str, float], int]]) -> None:
    """Several epochs' metrics in one write: (epoch, metrics, when they were measured in ms), for a
    caller that logs them later (the background thread): the UI's time axis is when they were measured."""
    from mlflow.entities import Metric

    items = [Metric(k, float(v), at_ms, epoch) for epoch, metrics, at_ms in epochs for k, v in metrics.items()]
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


def mark_failed(tracker: Tracker, run_id: str, tags: dict[str, Any]) -> None:
    """The end of a failed run: its reason as tags, then FAILED."""
    set_tags(tracker, run_id, tags)
    finish(tracker, run_id, "FAILED")


# --- artifacts -------------------------------------------------------------------------------------


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


def _artifact_root(tracker: Tracker, run_id: str) -> str:
    if run_id not in tracker.roots:
        tracker.roots[run_id] = tracker.client.get_run(run_id).info.artifact_uri
    return tracker.roots[run_id]


def local_artifact_dir(tracker: Tracker, run_id: str) -> str | None:
    """The run's artifact folder when the artifact store is a local folder, else None."""
    root = _artifact_root(tracker, run_id)
    if not root.startswith("file:"):
        return None
    from mlflow.utils.file_utils import local_file_uri_to_path

    return local_file_uri_to_path(root)


def write_atomic(path: str, data: bytes) -> None:
    """`data` into `path`, whole or not at all: a temporary file in the same folder, fsynced, then
    renamed over `path`. On any error (ENOSPC, EROFS, EACCES) the temporary file is removed, `path`
    is untouched, and the OSError names `path`."""
    folder = os.path.dirname(path)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise OSError(e.errno, e.strerror or str(e), path) from None
    try:  # the rename itself survives a power loss once the folder is synced (best effort)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _digest(data: bytes) -> str:
    return f"{hashlib.sha256(data).hexdigest()}:{len(data)}"


def log_torch(tracker: Tracker, run_id: str, artifact_path: str, obj: Any) -> None:
    """`torch.save(obj)` as an artifact, whole or not at all (module docstring). For the paths in
    DIGEST_TAGS, the digest tag is written first: "<new> <previous>"."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    tag = DIGEST_TAGS.get(artifact_path)
    if tag is not None:
        new = _digest(data)
        previous = tracker.digests.get((run_id, artifact_path))
        if previous is None:  # first write from this process: what the run says it holds
            previous = (tracker.client.get_run(run_id).data.tags.get(tag) or "").split(" ")[0]
        set_tags(tracker, run_id, {tag: f"{new} {previous}".strip()})
    local = local_artifact_dir(tracker, run_id)
    if local is not None:
        write_atomic(os.path.join(local, artifact_path), data)
    else:
        log_file(tracker, run_id, artifact_path, lambda p: Path(p).write_bytes(data))
    if tag is not None:
        tracker.digests[(run_id, artifact_path)] = new


class UnsafeArtifact(ArtifactDamaged):
    """A torch artifact that holds more than tensors and plain containers (a pickled object, code to
    run): refused, never executed; for a resume, a damaged checkpoint like any other."""


def load_torch(tracker: Tracker, run_id: str, artifact_path: str) -> Any | None:
    """Load a torch artifact with weights_only=True (plain tensors and containers only); None
    when the run has no such artifact. ArtifactDamaged (one line: the run, the path, what is
    wrong) when it does not match the digest written with it, or does not load; UnsafeArtifact,
    a kind of damage, when it holds more than tensors and plain containers."""
    from mlflow.exceptions import MlflowException

    local = local_artifact_dir(tracker, run_id)
    if local is not None:  # a local store: read in place (no copy, no progress bar)
        path = os.path.join(local, artifact_path)
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            data = f.read()
        return _load_checked(tracker, run_id, artifact_path, data, path)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = tracker.client.download_artifacts(run_id, artifact_path, tmp)
        except (MlflowException, OSError) as e:
            if transient(e):
                raise
            return None
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            data = f.read()
    return _load_checked(tracker, run_id, artifact_path, data, artifact_path)


def _load_checked(tracker: Tracker, run_id: str, artifact_path: str, data: bytes, shown: str) -> Any:
    import pickle

    import torch

    where = f"{shown} of run {run_id}"
    tag = DIGEST_TAGS.get(artifact_path)
    expected = []
    if tag is not None:
        expected = [d for d in (tracker.client.get_run(run_id).data.tags.get(tag) or "").split(" ") if d]
    digest = _digest(data)
    if expected and digest not in expected:
        sizes = {int(d.rsplit(":", 1)[1]) for d in expected}
        if len(data) < min(sizes):
            why = f"cut short ({len(data)} bytes, {' or '.join(map(str, sorted(sizes)))} were written)"
        else:
            why = "overwritten (its sha256 is not the one written with it)"
        raise ArtifactDamaged(f"{where} is damaged: {why}")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ArtifactDamaged(f"{where} is damaged: it does not load ({first_line(str(e), 80).split('. ')[0]})") \
                from None
        # torch's text is a page that ends in advice to load with weights_only=False (which would run
        # whatever the file holds): keep only what it found, on one line
        found = [line.strip().removeprefix("WeightsUnpickler error:").strip() for line in str(e).splitlines()]
        found = [line for line in found if line and "weights_only" not in line and "Weights only" not in line
                 and not line.startswith(("Check the documentation", "Please file an issue"))]
        detail = " ".join(found)[:300] or "not a file of tensors"
        raise UnsafeArtifact(f"{where} was refused, not loaded: {detail} (vaebench loads only tensors and plain "
                             "containers from artifacts, never code)") from None
    except Exception as e:  # noqa: BLE001 - any failure to load is damage; never a hint to unpickle
        raise ArtifactDamaged(f"{where} is damaged: it does not load ({first_line(str(e), 80).split('. ')[0]})") \
            from None
    tracker.digests[(run_id, artifact_path)] = digest
    return obj


# --- the tracking calls of a trainer, off its thread -------------------------------------------


class Background:
    """One thread that makes tracking calls in the order they are submitted, so that a trainer
    never waits for the store (per-epoch metrics, checkpoints, the final status).

    A call of this module's functions, `fn(tracker, run_id, ...)`, is a call *for that run*. When one
    fails (after the store's retries), the error is kept for its run (`error(run_id)`) and the
    run's later calls are skipped, except the ones that end it (`finish`, `mark_failed`); a
    `finish(..., "FINISHED")` of such a run becomes FAILED with the error. Other calls' errors are
    raised by `flush()` and `close()`. With `coalesce=key`, a call is skipped when a later one with
    the same key is already waiting (an older checkpoint that a newer one replaces anyway)."""

    ENDS = ("finish", "mark_failed")

    def __init__(self) -> None:
        import queue

        self._queue: Any = queue.Queue()
        self._error: BaseException | None = None
        self._errors: dict[str, BaseException] = {}
        self._latest: dict[Any, int] = {}
        self._seq = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="vaebench-tracking", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._run(*item)
            except BaseException as e:  # noqa: BLE001 - handed to the submitting thread by flush()
                self._error = e
            finally:
                self._queue.task_done()

    def _run(self, fn: Any, args: tuple, seq: int, coalesce: Any) -> None:
        if isinstance(fn, threading.Event):  # a marker: everything before it is done
            fn.set()
            return
        if coalesce is not None and self._latest.get(coalesce) != seq:
            return
        name = getattr(fn, "__name__", "")
        run_id = args[1] if getattr(fn, "__module__", None) == __name__ and len(args) > 1 else None
        if run_id is None:
            if self._error is None:  # after a failure, later calls are dropped: flush() reports it
                fn(*args)
            return
        failed = self._errors.get(run_id)
        if failed is not None:
            if name == "finish" and args[2:] in ((), ("FINISHED",)):
                mark_failed(args[0], run_id, {TAG_ERROR: f"{type(failed).__name__}: {first_line(failed)}"})
            elif name in self.ENDS:
                fn(*args)
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - kept for its run
            self._errors[run_id] = e
            if name in self.ENDS:
                raise

    def submit(self, fn: Any, *args: Any, coalesce: Any = None) -> None:
        with self._lock:
            self._seq += 1
            if coalesce is not None:
                self._latest[coalesce] = self._seq
            self._queue.put((fn, args, self._seq, coalesce))

    def idle(self) -> bool:
        """Nothing submitted is still waiting or running."""
        return self._queue.unfinished_tasks == 0

    def error(self, run_id: str) -> BaseException | None:
        """The error a call for `run_id` hit, if any so far."""
        return self._errors.get(run_id)

    def settle(self, run_id: str, timeout: float | None = None) -> BaseException | None:
        """Wait until the calls submitted so far are done; the error of `run_id`'s, if any."""
        if self._thread.is_alive():  # (after close() nothing is waiting any more)
            done = threading.Event()
            self.submit(done)
            done.wait(timeout)
        return self._errors.get(run_id)

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
