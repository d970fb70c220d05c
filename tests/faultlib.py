"""Helpers of the fault-injection tests: real stores, real processes, real servers.

- `study_file`: a tiny experiments file (digits, a small MLP, clustering and figures off);
- `runs_of`: the cell runs of a store, read back with a plain MlflowClient;
- `stop_after_checkpoint`: a `should_stop` that interrupts an in-process sweep of one cell at the
  start of its second epoch, once its first checkpoint is written (the run ends KILLED, with a
  checkpoint: something to resume); `interrupted_run` runs such a sweep;
- `vaebench`: a `vaebench run` subprocess (`python -m vaebench`);
- `MlflowServer`: `mlflow server` on 127.0.0.1 and a free port, started, killed and restarted by a
  test, with a SQLite backend and a local artifact folder.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, NamedTuple

STUDY = """
name: faults
defaults: {{dataset: digits, model: vae, epochs: {epochs}, batch_size: 16, max_train_samples: {samples},
           latent_dim: 2, arch_options: {{mlp: {{hidden: [16]}}}}}}
evaluate: {{iw_samples: 4, clustering: false, figures: {figures}}}
matrix:
  beta: {betas}
"""


def study_file(folder: Path, *, epochs: int = 2, betas: list[float] | None = None, samples: int = 160,
               figures: bool = False, extra: str = "", name: str = "experiments.yaml") -> Path:
    text = STUDY.format(epochs=epochs, betas=betas or [1.0], samples=samples, figures=str(figures).lower())
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip() + textwrap.dedent(extra))
    return path


def runs_of(uri: str, experiment: str = "faults", kind: str = "cell") -> list[Any]:
    """The runs of one kind (cell | parent), every lifecycle, oldest first."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], f"tags.`vaebench.kind` = '{kind}'", run_view_type=ViewType.ALL,
                              max_results=1000)
    return sorted(runs, key=lambda r: r.info.start_time)


def checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("**/checkpoints/last.pt"))


def quiet(_: str) -> None:
    pass


class Interrupted(NamedTuple):
    path: Path  # the experiments file
    exp: Any  # its Experiment
    uri: str  # its tracking store
    checkpoint: Path  # the one cell's checkpoint, written after epoch 0


def interrupted_run(folder: Path, epochs: int = 3) -> Interrupted:
    """A study of one cell in `folder`, interrupted after its first checkpoint (the run KILLED)."""
    import pytest

    from vaebench.config import load_experiment
    from vaebench.runner import run_experiment

    path = study_file(folder, epochs=epochs)
    exp = load_experiment(path)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(exp, progress=False, echo=quiet, should_stop=stop_after_checkpoint(folder))
    (checkpoint,) = checkpoints(folder)
    return Interrupted(path, exp, exp.resolved_tracking_uri(), checkpoint)


def stop_after_checkpoint(folder: Path, batches_per_epoch: int = 10) -> Callable[[], bool]:
    """Stop at the first batch of epoch 1, once epoch 0's checkpoint is on disk (it is written by
    a background thread: waited for, so that a slow machine does not train past it)."""
    calls = 0

    def stop() -> bool:
        nonlocal calls
        calls += 1
        if checkpoints(folder):
            return True
        if calls <= batches_per_epoch + 1:  # +1: the executor asks once before the unit
            return False
        wait_for(lambda: checkpoints(folder), 60, "the first checkpoint")
        return True

    return stop


def wait_for(condition: Callable[[], Any], timeout: float, what: str, poll: float = 0.05) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def env(**extra: str) -> dict[str, str]:
    """The environment of a child process: this one's, unbuffered, one thread, plus `extra`."""
    out = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    out.pop("MLFLOW_TRACKING_URI", None)
    out.update(extra)
    return out


def vaebench(args: list[str], cwd: Path, **extra_env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vaebench", *args], cwd=cwd, env=env(**extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


class Output:
    """A child's stdout and stderr, read as they come (a thread each): `text` so far, `wait()`."""

    def __init__(self, proc: subprocess.Popen):
        import threading

        self.proc, self.out, self.err = proc, [], []
        self._threads = [threading.Thread(target=self._read, args=(stream, into), daemon=True)
                         for stream, into in ((proc.stdout, self.out), (proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    @property
    def text(self) -> str:
        return "".join(self.out)

    def wait(self, timeout: float) -> tuple[int, str, str]:
        code = self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=30)
        return code, "".join(self.out), "".join(self.err)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1:<a free port>, its own process group (killed whole)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.artifacts = folder / "server-artifacts"
        self.proc: subprocess.Popen | None = None
        self.log = folder / "server.log"

    def start(self, timeout: float = 120) -> MlflowServer:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
               "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1"]
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT,
                                         env=env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), start_new_session=True)
        wait_for(self.healthy, timeout, f"mlflow server on port {self.port} ({self.log})", poll=0.2)
        return self

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.kill()


# --- file systems that fail -------------------------------------------------------------------------


def _mount(*args: str | Path) -> bool:
    import shutil

    if shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", *map(str, args)], capture_output=True).returncode == 0


def _writable(folder: Path) -> bool:
    probe = folder / ".probe"
    try:
        probe.write_bytes(b"x")
        probe.unlink()
        return True
    except OSError:
        return False


class ReadOnly:
    """`folder` made read-only and back: chmod for a normal user; for root (whom permissions do
    not stop) a read-only bind mount. `possible` is False where neither works."""

    def __init__(self, folder: Path):
        self.folder, self.mounted, self.possible = folder, False, True

    def on(self) -> None:
        if os.geteuid() != 0:
            for d in [self.folder, *[p for p in self.folder.rglob("*") if p.is_dir()]]:
                d.chmod(0o555)
        elif _mount("--bind", self.folder, self.folder):
            self.mounted = True
            _mount("-o", "remount,bind,ro", self.folder)
        self.possible = not _writable(self.folder)

    def off(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.folder)], capture_output=True)
            self.mounted = False
        elif os.geteuid() != 0:
            for d in [self.folder, *[p for p in self.folder.rglob("*") if p.is_dir()]]:
                d.chmod(0o755)


class Tmpfs:
    """A small tmpfs mounted on `folder` (root only; `possible` says whether it worked), and a
    filler file that takes all its free space (`fill`) and gives it back (`free`)."""

    def __init__(self, folder: Path, size: str = "8m"):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.possible = os.geteuid() == 0 and _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder)
        self.filler = folder / "filler"

    def fill(self) -> None:
        with open(self.filler, "wb", buffering=0) as f:
            for size in (64 * 1024, 1):  # big pieces, then the last bytes
                try:
                    while True:
                        f.write(bytes(size))
                except OSError:
                    pass

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        if self.possible:
            subprocess.run(["umount", "-l", str(self.folder)], capture_output=True)
