"""Stores that fail, against real stores and processes: a full disk or a read-only artifact store
while a checkpoint is written (the cell fails in one line, the last good checkpoint stays, the next
run resumes from it), a full disk under a figure, a read-only tracking store, a SQLite file locked
by another writer, and a tracking server killed mid-run, restarted in time or not."""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from pathlib import Path

import mlflow
import pytest

from faultlib import (MlflowServer, Output, ReadOnly, Tmpfs, checkpoints, interrupted_run, quiet, runs_of, study_file,
                      vaebench, wait_for)
from vaebench import claims, tracking
from vaebench.config import load_experiment
from vaebench.runner import run_experiment


def full_disk_at_fsync(fd: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("fault", ["disk full (injected ENOSPC)", "disk full (a real tmpfs)", "read-only artifacts"])
def test_a_store_that_cannot_take_a_checkpoint_fails_the_cell_and_keeps_the_last_good_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    artifacts = tmp_path / "mlartifacts"
    disk = Tmpfs(artifacts) if "tmpfs" in fault else None
    if disk is not None and not disk.possible:
        pytest.skip("mounting a tmpfs needs root")
    try:
        path, exp, uri, checkpoint = interrupted_run(tmp_path)  # a checkpoint after epoch 0, then stopped
        good = checkpoint.read_bytes()

        read_only = ReadOnly(artifacts) if "read-only" in fault else None
        if disk is not None:
            disk.fill()
        elif read_only is not None:
            read_only.on()
            if not read_only.possible:
                read_only.off()
                pytest.skip("cannot make a folder read-only here")
        else:
            monkeypatch.setattr(os, "fsync", full_disk_at_fsync)
        try:
            summary = run_experiment(exp, progress=False, echo=quiet)
        finally:
            monkeypatch.undo()
            if disk is not None:
                disk.free()
            if read_only is not None:
                read_only.off()

        assert summary.exit_code == 1
        (failed,) = summary.of("failed")
        words = {"read-only artifacts": ("Read-only file system", "Permission denied")}.get(
            fault, ("No space left on device",))
        assert any(w in failed.error for w in words) and str(artifacts) in failed.error, failed.error
        assert "\n" not in failed.error
        (run,) = runs_of(uri)
        assert run.info.status == "FAILED" and run.data.tags[tracking.TAG_FAILURE] == "environment"
        assert checkpoint.read_bytes() == good, "the last good checkpoint is kept"
        assert [p.name for p in checkpoint.parent.iterdir()] == ["last.pt"], "nothing half-written left"

        again = run_experiment(exp, progress=False, echo=quiet)  # the environment failed: resumed
        assert again.exit_code == 0 and len(again.of("resumed")) == 1
        (run,) = runs_of(uri)
        assert run.info.status == "FINISHED" and run.data.tags["vaebench.resumed_from_epoch"] == "0"
        assert "No space" in run.data.tags["vaebench.retried_after"] or "only" in run.data.tags["vaebench.retried_after"] \
            or "Permission" in run.data.tags["vaebench.retried_after"]
        assert tracking.TAG_ERROR not in run.data.tags
        steps = [m.step for m in mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "train/loss")]
        assert sorted(steps) == [0, 1, 2], "every epoch logged exactly once"
    finally:
        if disk is not None:
            disk.unmount()


def test_a_full_disk_under_a_figure_fails_the_cell_and_the_next_run_only_evaluates_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.figure

    path = study_file(tmp_path, epochs=2, figures=True)
    exp = load_experiment(path)
    uri = exp.resolved_tracking_uri()

    def no_space(self: object, fname: object, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fname))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", no_space)
    summary = run_experiment(exp, progress=False, echo=quiet)
    monkeypatch.undo()
    (failed,) = summary.of("failed")
    assert "No space left on device" in failed.error and ".png" in failed.error
    (run,) = runs_of(uri)
    assert run.info.status == "FAILED" and run.data.tags[tracking.TAG_FAILURE] == "environment"
    client = mlflow.MlflowClient(uri)
    assert not client.get_metric_history(run.info.run_id, "test/elbo")  # nothing half-evaluated taken for whole

    again = run_experiment(exp, progress=False, echo=quiet)
    assert len(again.of("resumed")) == 1
    (run,) = runs_of(uri)
    assert run.info.status == "FINISHED" and run.data.tags["vaebench.resumed_from_epoch"] == "1"  # not retrained
    assert len(client.get_metric_history(run.info.run_id, "test/elbo")) == 1
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [0, 1]
    assert "figures/samples.png" in {a.path for a in client.list_artifacts(run.info.run_id, "figures")}


@pytest.mark.slow
def test_a_read_only_tracking_store_is_one_clear_line(tmp_path: Path) -> None:
    store = tmp_path / "store"
    path = study_file(tmp_path, epochs=1, extra=f"tracking_uri: sqlite:///{store / 'mlruns.db'}\n")
    assert run_experiment(load_experiment(path), progress=False, echo=quiet).exit_code == 0
    read_only = ReadOnly(store)
    read_only.on()
    try:
        if not read_only.possible:
            pytest.skip("cannot make a folder read-only here")
        code, out, err = Output(vaebench(["run", str(path), "--no-progress", "--no-report"], tmp_path)).wait(300)
    finally:
        read_only.off()
    assert code == 1, out + err
    assert "Traceback" not in err and "[SQL:" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the tracking store is read-only" in errors[0], err


@pytest.mark.slow
def test_a_sqlite_file_locked_by_another_writer_is_waited_for(tmp_path: Path) -> None:
    path = study_file(tmp_path, epochs=150, samples=160)
    uri = load_experiment(path).resolved_tracking_uri()
    runner = Output(vaebench(["run", str(path), "--no-progress", "--no-report"], tmp_path))
    wait_for(lambda: checkpoints(tmp_path), 120, "the first checkpoint")
    db = sqlite3.connect(str(tmp_path / "mlruns.db"), isolation_level=None, timeout=60)
    db.execute("BEGIN EXCLUSIVE")  # longer than SQLite's own wait (MLflow sets 20 s)
    time.sleep(25)
    db.execute("ROLLBACK")
    db.close()
    code, out, err = runner.wait(300)
    assert code == 0, out + err
    assert "database is locked" not in out + err and "Traceback" not in out + err
    (run,) = runs_of(uri)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(150)), "every epoch logged exactly once"


def _server_run(tmp_path: Path, server: MlflowServer, patience: str, epochs: int) -> tuple[Path, Output]:
    path = study_file(tmp_path, epochs=epochs, samples=160)
    # MLflow's own HTTP retries off, so that vaebench's are what is tested
    runner = Output(vaebench(["run", str(path), "--no-progress", "--no-report"], tmp_path,
                             MLFLOW_TRACKING_URI=server.url, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                             VAEBENCH_STORE_PATIENCE=patience))
    wait_for(lambda: checkpoints(server.artifacts), 120, "the first checkpoint")
    return path, runner


@pytest.mark.slow
def test_a_tracking_server_killed_and_restarted_mid_run_loses_nothing(tmp_path: Path) -> None:
    with MlflowServer(tmp_path) as server:
        _, runner = _server_run(tmp_path, server, patience="300", epochs=400)
        server.kill()
        time.sleep(3)
        assert runner.proc.poll() is None, "the runner waits for the store"
        server.start()
        code, out, err = runner.wait(600)
        assert code == 0, out + err
        assert "Traceback" not in err
        (run,) = runs_of(server.url)
        assert run.info.status == "FINISHED"
        steps = [m.step for m in mlflow.MlflowClient(server.url).get_metric_history(run.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(400)), "every epoch's metrics retried until the server took them"


@pytest.mark.slow
def test_a_tracking_server_gone_for_longer_than_the_patience_fails_the_run_and_a_rerun_resumes_it(
        tmp_path: Path) -> None:
    with MlflowServer(tmp_path) as server:
        path, runner = _server_run(tmp_path, server, patience="3", epochs=400)
        server.kill()
        code, out, err = runner.wait(300)
        assert code == 1, out + err
        assert "Traceback" not in err
        said = [line for line in (out + err).splitlines() if "StoreUnavailable" in line]
        assert said and all(f"the tracking store {server.url} did not answer" in line for line in said), out + err
        server.start()  # the run could not be ended while the store was away: the next run continues it
        (run,) = runs_of(server.url)
        assert run.info.status == "RUNNING"
        rerun = Output(vaebench(["run", str(path), "--no-progress", "--no-report"], tmp_path,
                                MLFLOW_TRACKING_URI=server.url))
        code, out, err = rerun.wait(600)
        assert code == 0, out + err
        assert "1 trained (1 resumed)" in out
        (run,) = runs_of(server.url)
        assert run.info.status == "FINISHED"
        steps = [m.step for m in mlflow.MlflowClient(server.url).get_metric_history(run.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(400)), "nothing lost, nothing twice"
        assert not [k for k in mlflow.MlflowClient(server.url).get_experiment_by_name("faults").tags
                    if k.startswith(claims.CLAIM)]
