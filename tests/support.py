"""Helpers shared by test modules (not a test module itself): a real MLflow tracking server on a
loopback port, a loopback listener that counts every connection made to it, and a tracking store
whose runs carry URLs in every free-text place the report reads.

Imported as `support` (pytest puts tests/ on sys.path for its test modules)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from vaebench import tracking
from vaebench.config import Experiment, load_experiment
from vaebench.matrix import expand


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


class Listener:
    """A TCP socket on a loopback port that accepts and counts every connection (any protocol:
    HTTP, a database driver, ...) and answers nothing. `url` is http://127.0.0.1:<port>."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections: list[bytes] = []  # what each connection sent within a moment
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:  # the timeout: look at _stop again
                continue
            with conn:
                conn.settimeout(0.5)
                try:
                    self.connections.append(conn.recv(4096))
                except OSError:
                    self.connections.append(b"")

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.3)  # a connection still in the backlog gets accepted and counted
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


URL_STUDY = """
name: links
seeds: [0]
defaults:
  dataset: digits
  epochs: 1
  arch_options:
    mlp: {hidden: [16]}
matrix:
  model: [ae, vae]
  latent_dim: [2, 3]
"""


def png(seed: int) -> bytes:
    from PIL import Image

    image = Image.effect_noise((64, 64), 40 + seed).convert("L")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def log_runs_with_urls(folder: Path, url: str) -> Experiment:
    """An experiments file in `folder` and a SQLite store next to it holding what `vaebench run` and
    `vaebench tune` would log (no training: the runs are written directly), where every name, param,
    tag, error and machine tag the report reads holds `url`, bare or inside markup that would fetch
    it (`<img src>`, `<link>`, CSS `url()`). Two cells finish (z=2), two fail (z=3); a parent run; two
    Optuna study runs: one whose `optuna.storage` tag names a database server at `url`'s host and
    port, one naming a real SQLite Optuna storage elsewhere (folder/elsewhere/optuna.db: study
    `elsewhere`, 3 trials, while MLflow holds 2 of them)."""
    import optuna

    path = folder / "experiments.yaml"
    path.write_text(textwrap.dedent(URL_STUDY).lstrip())
    exp = load_experiment(path)
    host = url.split("//", 1)[1]

    def markup(where: str) -> str:
        return (f"{url}/{where} <img src='{url}/{where}.png'> <link rel=stylesheet href=\"{url}/{where}.css\"> "
                f"<div style=\"background:url({url}/{where}-bg)\"></div> <a href=\"{url}/{where}\">x</a>")

    tracker = tracking.connect(exp.resolved_tracking_uri(), exp.name)
    parent = tracking.start_run(tracker, f"sweep <img src='{url}/sweep.png'>", {
        tracking.TAG_KIND: "parent", "vaebench.host": markup("host"), "vaebench.python": f"{url}/python",
        "vaebench.torch": markup("torch"), "vaebench.cuda": f"//{host}/cuda"})
    tracking.finish(tracker, parent)
    for i, spec in enumerate(expand(exp)):
        name = f"{url}/run/{spec.name}" if i == 0 else spec.name
        run = tracking.start_run(tracker, name, {
            tracking.TAG_KIND: "cell", tracking.TAG_RUN_KEY: spec.key,
            **{axis: tracking.tag_value(v) for axis, v in spec.axes.items()}}, parent)
        tracking.log_params(tracker, run, {**spec.params(), "homepage": f"{url}/param",
                                           "notes": markup("param")})
        tracking.set_tags(tracker, run, {"mlflow.note.content": markup("note"), "vaebench.device": markup("device"),
                                         "arch": f"<img src='{url}/arch.png'>mlp", "source": f"{url}/source"})
        if spec.settings.latent_dim == 3:
            tracking.set_tags(tracker, run, {tracking.TAG_ERROR: "RuntimeError: " + markup("error")})
            tracking.finish(tracker, run, "FAILED")
            continue
        for step in range(3):
            tracking.log_metrics(tracker, run, {"val/neg_elbo": 120 - 10 * step, "val/recon": 100 - 8 * step},
                                 step=step)
        vae = spec.settings.model == "vae"
        tracking.log_metrics(tracker, run, {"test/recon_mse": 0.05 + 0.01 * i, "train/seconds": 1.5 + i,
                                            "effective_beta": 1.0, "test/kmeans_acc": 0.4 + 0.1 * i,
                                            **({"test/elbo": -95.0 - i, "test/kl": 4.0} if vae else {})}, step=2)
        for j, figure in enumerate(("reconstructions.png", "latent_scatter.png")):
            tracking.log_file(tracker, run, f"figures/{figure}", lambda p, j=j: Path(p).write_bytes(png(i + j)))
        tracking.finish(tracker, run)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    elsewhere = "sqlite:///" + str(folder / "elsewhere" / "optuna.db")
    (folder / "elsewhere").mkdir()
    study = optuna.create_study(study_name="elsewhere", storage=elsewhere, direction="maximize")
    study.optimize(lambda t: -abs(t.suggest_float("lr", 1e-4, 1e-2, log=True) - 1e-3), n_trials=3)
    for name, storage in (("net", f"postgresql://user:secret@{host}/optuna"), ("elsewhere", elsewhere)):
        study_run = tracking.start_run(tracker, name, {
            tracking.TAG_KIND: "study", "optuna.study_name": name, "optuna.storage": storage,
            "vaebench.metric": "test/elbo", "vaebench.direction": "maximize"})
        for number in range(2):
            trial = tracking.start_run(tracker, f"{url}/trial/{number}", {
                tracking.TAG_KIND: "trial", "vaebench.trial_number": number, "optuna.study_name": name,
                "vaebench.trial_state": "COMPLETE"}, study_run)
            tracking.log_params(tracker, trial, {"lr": 10 ** -(2 + number), "homepage": f"{url}/trial"})
            tracking.log_metrics(tracker, trial, {"test/elbo": -90.0 - number})
            tracking.finish(tracker, trial)
        tracking.finish(tracker, study_run)
    return exp
