"""Helpers shared by test modules (not a test module itself): a real MLflow tracking server on a
loopback port.

Imported as `support` (pytest puts tests/ on sys.path for its test modules)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(folder: Path, backend_uri: str) -> Iterator[str]:
    """`mlflow server` on a free loopback port over `backend_uri`, serving the artifacts of the
    experiments it creates (`mlflow-artifacts:` URIs, kept in folder/mlartifacts; experiments made
    before keep their own location); yields its base URL once /health answers, stops it afterwards."""
    port = free_port()
    log = open(folder / f"mlflow-server-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
                             "--artifacts-destination", (folder / "mlartifacts").as_uri(),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            # no background job runner (7 huey worker processes) for a test server
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base, proc, log.name)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its worker, started here
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)
        log.close()


def wait_for_health(base: str, proc: subprocess.Popen, log: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, f"the MLflow server exited ({proc.returncode}); see {log}"
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.read().decode().strip() == "OK":
                    return
        except OSError:
            pass
        assert time.time() < deadline, f"the MLflow server did not answer /health within {timeout} s; see {log}"
        time.sleep(0.5)
