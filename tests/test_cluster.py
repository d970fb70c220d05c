"""vaebench on a cluster, on one machine with real components on loopback: a Ray cluster started
by the test, PostgreSQL (the databases of MLflow and Optuna), an `mlflow server` on it with its
own artifact store. The Ray executor must record what the local one records; studies run their
Optuna workers as Ray tasks on the shared RDB storage; a dataset is downloaded once however many
processes ask for it at the same time.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import mlflow
import pandas as pd
import pytest

from vaebench.config import load_experiment
from vaebench.runner import RayOptions, run_experiment

pytestmark = pytest.mark.slow

STUDY = """
name: cluster
seeds: [0]
defaults:
  dataset: digits
  epochs: {epochs}
  batch_size: 64
  max_train_samples: 256
  latent_dim: 2
  arch_options: {{mlp: {{hidden: [32]}}}}
evaluate: {{iw_samples: 8, clustering: false, figures: false}}
matrix:
  model: [ae, vae]
  beta: [1.0, 2.0]
exclude:
  - {{model: ae, beta: 2.0}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not come up in {seconds:.0f} s")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} is not installed: `make postgres` (apt-get install postgresql)")
    return found


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL server of the test's own on 127.0.0.1 with databases `mlflow` and `optuna`;
    yields the URL prefix postgresql://vb@127.0.0.1:PORT/ . (initdb refuses root: as root it runs
    as the `postgres` user, in a folder of its own: pytest's tmp_path is root's alone.)"""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="vaebench-pg-"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "postgres")
    data, port = root / "data", free_port()
    subprocess.run([*as_user, _pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "vb"], check=True,
                   capture_output=True)
    subprocess.run([*as_user, _pg_bin("pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        for db in ("mlflow", "optuna"):
            subprocess.run([*as_user, _pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "vb", db],
                           check=True, capture_output=True)
        yield f"postgresql://vb@127.0.0.1:{port}/"
    finally:
        subprocess.run([*as_user, _pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def tracking_server(postgres: str, tmp_path_factory) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 backed by the PostgreSQL database, serving its artifacts."""
    port = free_port()
    artifacts = tmp_path_factory.mktemp("artifacts")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres + "mlflow",
                             "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, "mlflow server", 120)
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def cells(uri: str, name: str = "cluster") -> pd.DataFrame:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], "tags.`vaebench.kind` = 'cell'")
    rows = [{"name": r.info.run_name, "status": r.info.status, **{f"params.{k}": v for k, v in r.data.params.items()},
             **{f"metrics.{k}": v for k, v in r.data.metrics.items()}} for r in runs]
    return pd.DataFrame(rows).set_index("name").sort_index()


def test_the_ray_executor_records_what_the_local_one_records(ray_cluster, tracking_server: str, write_yaml,
                                                             tmp_path: Path, monkeypatch) -> None:
    path = write_yaml(STUDY.format(epochs=2))
    local = run_experiment(load_experiment(path), progress=False, echo=lambda s: None)
    assert local.exit_code == 0
    local_uri = load_experiment(path).resolved_tracking_uri()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)  # the cluster's server, PostgreSQL behind it
    on_ray = run_experiment(load_experiment(path), progress=False, echo=lambda s: None, ray=RayOptions())
    assert on_ray.exit_code == 0 and len(on_ray.of("trained")) == 3

    a, b = cells(local_uri), cells(tracking_server)
    assert list(a.index) == list(b.index) and set(b["status"]) == {"FINISHED"}
    params = [c for c in a.columns if c.startswith("params.")]
    pd.testing.assert_frame_equal(a[params], b[params])
    metrics = ["metrics.test/recon_mse", "metrics.train/loss", "metrics.val/loss", "metrics.test/elbo"]
    pd.testing.assert_frame_equal(a[metrics], b[metrics], rtol=1e-5)
    # each run has its artifacts in the server's store, and rerunning skips every cell
    client = mlflow.MlflowClient(tracking_server)
    run_id = client.search_runs([client.get_experiment_by_name("cluster").experiment_id])[0].info.run_id
    assert {"checkpoints", "model", "config"} <= {f.path for f in client.list_artifacts(run_id)}
    again = run_experiment(load_experiment(path), progress=False, echo=lambda s: None, ray=RayOptions())
    assert len(again.of("skipped")) == 3


TUNE = """
tune:
  cell: {model: vae, beta: 1.0}
  metric: test/elbo
  direction: maximize
  n_trials: 6
  sampler: random
  seed: 0
  pruner: median
  pruner_options: {n_startup_trials: 1, n_warmup_steps: 0}
  space:
    lr: {low: 1.0e-5, high: 1.0e-1, log: true}
  enqueue:
    - {lr: 1.0e-2}
    - {lr: 1.0e-2}
    - {lr: 1.0e-5}
    - {lr: 1.0e-5}
    - {lr: 1.0e-5}
    - {lr: 1.0e-5}
"""


def test_a_study_runs_its_optuna_workers_as_ray_tasks_on_postgresql(ray_cluster, tracking_server: str,
                                                                   postgres: str, write_yaml, monkeypatch) -> None:
    import optuna
    from optuna.trial import TrialState

    from vaebench.tune import tune_experiment

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    path = write_yaml(STUDY.format(epochs=6) + TUNE)
    exp = load_experiment(path)
    exp = exp.model_copy(update={"tune": exp.tune.model_copy(update={"storage": postgres + "optuna"})})
    lines: list[str] = []
    assert tune_experiment(exp, n_jobs=2, on_ray=True, echo=lines.append) == 0
    assert any("2 workers as Ray tasks" in line for line in lines)
    study = optuna.load_study(study_name="cluster-tune", storage=postgres + "optuna")
    states = [t.state for t in study.trials]
    assert len(states) == 6 and TrialState.PRUNED in states and TrialState.COMPLETE in states
    client = mlflow.MlflowClient(tracking_server)
    trials = client.search_runs([client.get_experiment_by_name("cluster").experiment_id],
                                "tags.`vaebench.kind` = 'trial'")
    assert len(trials) == 6  # one MLflow run per trial, none twice
    assert {r.info.status for r in trials} == {"FINISHED", "KILLED"}  # pruned trials end KILLED


class _SlowDownload:
    """Stands in for a torchvision MNIST-family class whose files must be downloaded: its
    download writes them after a pause and counts itself (the network is not reachable here)."""

    resources = [("train-images-idx3-ubyte.gz", None)]
    classes = ["0", "1"]

    def __init__(self, root: str, train: bool = True, download: bool = False):
        folder = Path(root) / type(self).__name__ / "raw"
        if download and not (folder / "train-images-idx3-ubyte").exists():
            with open(Path(root) / "downloads.log", "a") as log:
                log.write(f"{os.getpid()}\n")
            time.sleep(1.0)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "train-images-idx3-ubyte").write_bytes(b"x")
        if not (folder / "train-images-idx3-ubyte").exists():
            raise RuntimeError("Dataset not found")
        import torch

        self.data, self.targets = torch.zeros(2, 4, 4, dtype=torch.uint8), [0, 1]


def _read(root: str) -> int:
    from vaebench.data import read_torchvision

    return len(read_torchvision(_SlowDownload, root, download=True).train_x)


def test_a_dataset_is_downloaded_once_however_many_processes_ask(tmp_path: Path) -> None:
    with multiprocessing.get_context("fork").Pool(3) as pool:
        assert pool.map(_read, [str(tmp_path)] * 3) == [2, 2, 2]
    assert len((tmp_path / "downloads.log").read_text().split()) == 1


def _ray_task_pids() -> list[int]:
    """The Ray worker processes running a unit now (Ray titles them after the task's function)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes().startswith(b"ray::_unit_in_ray"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            pass
    return pids


def test_a_ray_worker_killed_mid_cell_leaves_every_cell_finished_exactly_once(ray_cluster, write_yaml,
                                                                             tmp_path: Path) -> None:
    import signal
    import threading

    epochs = 1000  # a few seconds a cell: long enough that both are still training when one is killed
    path = write_yaml(STUDY.format(epochs=epochs).replace("beta: [1.0, 2.0]", "beta: [1.0]")
                      .replace("exclude:\n  - {model: ae, beta: 2.0}\n", ""))  # ae and vae
    summary: list = []
    runner = threading.Thread(target=lambda: summary.append(
        run_experiment(load_experiment(path), progress=False, echo=lambda s: None, ray=RayOptions())))
    runner.start()
    checkpoints = lambda: list((tmp_path / "mlartifacts").glob("**/checkpoints/last.pt"))  # noqa: E731
    # Both cells run at once (2 CPUs, one cell per task on the CPU). Wait until each has a
    # checkpoint, so whichever worker is killed, its cell has one to resume from.
    wait_for(lambda: len(checkpoints()) == 2 and _ray_task_pids(), "two units with a checkpoint each", 300)
    (victim, *_) = _ray_task_pids()
    os.kill(victim, signal.SIGKILL)  # the worker dies mid-cell; Ray retries its task
    runner.join(timeout=600)
    assert not runner.is_alive() and summary and summary[0].exit_code == 0
    assert len(summary[0].of("trained", "resumed")) == 2 and summary[0].of("resumed")

    client = mlflow.MlflowClient(load_experiment(path).resolved_tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name("cluster").experiment_id],
                              "tags.`vaebench.kind` = 'cell'")
    assert sorted(r.info.run_name for r in runs) == ["ae-mlp-z2-b1-sum-digits-s0", "vae-mlp-z2-b1-sum-digits-s0"]
    assert {r.info.status for r in runs} == {"FINISHED"}  # one run per cell, none left RUNNING
    resumed = [r for r in runs if "vaebench.resumed_from_epoch" in r.data.tags]
    assert len(resumed) == 1
    steps = sorted(m.step for m in client.get_metric_history(resumed[0].info.run_id, "train/loss"))
    assert steps == list(range(epochs)), "every epoch logged exactly once"


@pytest.mark.parametrize("form", ["{}", "ray://{}"])
def test_a_cluster_address_where_nothing_answers_is_one_clear_error(tiny_file: Path, form: str) -> None:
    """Ray waits on such an address for minutes (measured: still waiting after 11 min); vaebench
    tries one TCP connection first and says what to do. In a process of its own: this one may be
    connected to the other tests' cluster already."""
    from vaebench.cluster import unreachable

    address = form.format(f"127.0.0.1:{free_port()}")  # bound, then released: nothing listens there
    proc = subprocess.run([sys.executable, "-m", "vaebench", "run", str(tiny_file), "--no-progress",
                           "--executor", "ray", "--ray-address", address],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 1, proc.stderr
    assert f"error: could not connect to the Ray cluster at {address}: nothing answers there" in proc.stderr
    assert "ray start --head" in proc.stderr and "Traceback" not in proc.stderr
    assert unreachable("auto") is None and unreachable(None) is None  # left to Ray, which finds its own
