"""End to end through MLflow: what a sweep logs, skip / force / failure handling, and resume
after a real interruption. Every test uses its own SQLite store in tmp_path."""

from __future__ import annotations

import html
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from vaebench import tracking
from vaebench.config import load_experiment
from vaebench.models import build_model
from vaebench.runner import run_experiment


def child_runs(exp_path: Path, name: str = "tiny"):
    exp = load_experiment(exp_path)
    mlflow.set_tracking_uri(exp.resolved_tracking_uri())
    df = mlflow.search_runs(experiment_names=[name])
    return df[df["tags.vaebench.kind"] == "cell"], df[df["tags.vaebench.kind"] == "parent"]


def test_sweep_logs_params_tags_metrics_and_artifacts(tiny_file: Path) -> None:
    summary = run_experiment(load_experiment(tiny_file), progress=False, echo=lambda s: None)
    assert summary.exit_code == 0 and len(summary.of("trained")) == 2
    cells, parents = child_runs(tiny_file)
    assert len(cells) == 2 and len(parents) == 1
    parent_id = parents["run_id"].iloc[0]
    assert set(cells["tags.mlflow.parentRunId"]) == {parent_id}
    assert set(cells["tags.mlflow.runName"]) == {"ae-mlp-z2-b1-sum-digits-s0", "vae-mlp-z2-b1-sum-digits-s0"}
    assert set(cells["status"]) == {"FINISHED"}
    # axis values as tags, every setting as a param
    assert set(cells["tags.model"]) == {"ae", "vae"} and set(cells["tags.latent_dim"]) == {"2"}
    assert set(cells["params.lr"]) == {"0.001"} and set(cells["params.arch_options.mlp.hidden"]) == {"[32]"}
    assert cells["tags.vaebench.run_key"].str.len().eq(12).all()
    assert set(cells["tags.vaebench.dataset_source"]) == {"sklearn.datasets.load_digits"}
    vae = cells[cells["tags.model"] == "vae"].iloc[0]
    ae = cells[cells["tags.model"] == "ae"].iloc[0]
    assert vae["metrics.test/elbo"] < 0 and vae["metrics.test/nll_iw"] <= -vae["metrics.test/elbo"] + 1e-6
    assert vae["metrics.effective_beta"] == 1.0 and vae["metrics.test/recon_mse"] > 0
    # deterministic models: ELBO-type metrics absent (not applicable), never zero
    assert ae["metrics.test/recon_mse"] > 0 and ae.isna()["metrics.test/elbo"]
    assert "test/elbo" in ae["tags.vaebench.not_applicable"]

    client = mlflow.MlflowClient()
    history = client.get_metric_history(vae["run_id"], "train/loss")
    assert sorted(m.step for m in history) == [0, 1]
    assert len(client.get_metric_history(vae["run_id"], "val/loss")) == 2
    for key in ("test/elbo", "test/recon_mse", "effective_beta", "train/seconds"):
        assert len(client.get_metric_history(vae["run_id"], key)) == 1, f"{key} logged more than once"
    # the final checkpoint loads with weights_only=True and rebuilds the model
    tracker = tracking.connect(mlflow.get_tracking_uri(), "tiny")
    saved = tracking.load_torch(tracker, vae["run_id"], tracking.MODEL_PATH)
    model = build_model("vae", "mlp", in_shape=tuple(saved["in_shape"]), latent_dim=2,
                        arch_options=saved["settings"]["arch_options"]["mlp"])
    model.load_state_dict(saved["state_dict"])
    artifacts = {a.path for a in client.list_artifacts(vae["run_id"])}
    assert {"config", "model", "checkpoints"} <= artifacts


def test_epoch_metrics_carry_the_time_the_epoch_ended_not_the_time_they_were_written(tmp_path: Path) -> None:
    """The trainer hands each epoch's metrics to a background thread; their MLflow timestamp is the
    one the trainer gives, so the UI's time axis is training time even when the writes lag."""
    tracker = tracking.connect(f"sqlite:///{tmp_path}/mlruns.db", "stamps")
    run_id = tracker.client.create_run(tracker.experiment_id).info.run_id
    background = tracking.Background()
    ended = int(time.time() * 1000)
    background.submit(time.sleep, 0.3)  # a write queue that lags
    background.submit(tracking.log_epochs, tracker, run_id, [(3, {"train/loss": 1.5}, ended)])
    background.close()
    (metric,) = tracker.client.get_metric_history(run_id, "train/loss")
    assert (metric.step, metric.value, metric.timestamp) == (3, 1.5, ended)



@pytest.mark.parametrize("pack", [1, 2], ids=["plain", "packed"])
def test_epoch_metrics_held_back_are_written_when_the_sweep_stops(tmp_path: Path, monkeypatch, pack: int) -> None:
    """Between checkpoints, epoch metrics are sent at most every units.METRICS_EVERY_S, several
    epochs in one write. A stop sends those held back: the KILLED run has every epoch it finished,
    once, and the resumed run logs the rest."""
    from faultlib import quiet, runs_of, study_file
    from vaebench import units

    monkeypatch.setattr(units, "METRICS_EVERY_S", 3600.0)  # after the first epoch, hold every one back
    exp = load_experiment(study_file(tmp_path, epochs=6, betas=[1.0, 2.0][:pack]))
    uri = exp.resolved_tracking_uri()
    batches = 0

    def stop() -> bool:  # in the middle of epoch 3 (10 batches an epoch)
        nonlocal batches
        batches += 1
        return batches > 1 + 3 * 10 + 5

    with pytest.raises(KeyboardInterrupt):
        run_experiment(exp, pack=pack, progress=False, echo=quiet, should_stop=stop)
    client = mlflow.MlflowClient(uri)
    runs = runs_of(uri)
    assert len(runs) == pack and {r.info.status for r in runs} == {"KILLED"}
    for run in runs:
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [0, 1, 2]

    run_experiment(exp, pack=pack, progress=False, echo=quiet)  # from epoch 0's checkpoint
    for run in runs_of(uri):
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(6))


def test_rerun_skips_finished_and_force_retrains(tiny_file: Path) -> None:
    exp = load_experiment(tiny_file)
    run_experiment(exp, progress=False, echo=lambda s: None)
    lines: list[str] = []
    again = run_experiment(exp, progress=False, echo=lines.append)
    assert len(again.of("skipped")) == 2 and not again.of("trained")
    assert sum("skipped" in line for line in lines) == 2
    cells, parents = child_runs(tiny_file)
    assert len(cells) == 2 and len(parents) == 2
    forced = run_experiment(exp, force=True, only={"model": ["vae"]}, progress=False, echo=lambda s: None)
    assert len(forced.of("trained")) == 1
    cells, _ = child_runs(tiny_file)
    assert len(cells) == 3


def test_a_failed_cell_does_not_stop_the_others(write_yaml, tmp_path: Path) -> None:
    path = write_yaml(f"""
    name: tiny
    data_dir: {tmp_path / 'empty'}
    defaults: {{epochs: 1, max_train_samples: 128, arch_options: {{mlp: {{hidden: [16]}}}}}}
    evaluate: {{iw_samples: 4, clustering: false, figures: false}}
    matrix:
      dataset: [mnist, digits]
      latent_dim: [2, 3]
    """)
    summary = run_experiment(load_experiment(path), progress=False, echo=lambda s: None)
    assert summary.exit_code == 1
    assert [r.spec.settings.dataset for r in summary.of("failed")] == ["mnist", "mnist"]
    assert [r.spec.settings.dataset for r in summary.of("trained")] == ["digits", "digits"]
    assert "DatasetUnavailable" in summary.of("failed")[0].error
    assert str(tmp_path / "empty") in summary.of("failed")[0].error
    # the summary says what to do about it (the error's own further lines), once for both cells
    lines = summary.lines()
    failed = [i for i, line in enumerate(lines) if line.startswith("  FAILED")]
    assert len(failed) == 2
    fix = lines[failed[0] + 1:failed[1]]
    assert fix[0].startswith("    expected files: train-images-idx3-ubyte")
    assert any(line.startswith(f"    to fix: copy torchvision-layout files into {tmp_path / 'empty'}") for line in fix)
    assert lines[failed[1] + 1:] == []


def test_an_image_folder_beside_the_file_a_bad_image_and_one_class(write_yaml, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # path: relative to the experiments file, wherever vaebench runs from
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(12):  # flat: one class
        Image.fromarray(torch.randint(0, 256, (8, 8), generator=g, dtype=torch.uint8).numpy()).save(folder / f"{i}.png")
    (folder / "bad.png").write_bytes(b"\x89PNG cut short")
    path = write_yaml("""
    name: tiny
    defaults: {dataset: image_folder, dataset_options: {image_folder: {path: imgs, channels: 1}}, epochs: 1,
               arch_options: {mlp: {hidden: [16]}}}
    evaluate: {iw_samples: 4, figures: false}
    matrix: {model: [vae]}
    """)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    exp = load_experiment(path)
    first = run_experiment(exp, progress=False, echo=lambda s: None)
    assert first.exit_code == 1 and "DatasetUnavailable" in first.of("failed")[0].error
    assert f"cannot read {folder / 'bad.png'}" in first.of("failed")[0].error

    (folder / "bad.png").unlink()  # a data problem: fixed, the rerun trains the cell
    again = run_experiment(exp, progress=False, echo=lambda s: None)
    assert again.exit_code == 0 and len(again.of("trained")) == 1
    cells, _ = child_runs(path)
    done = cells[cells["status"] == "FINISHED"].iloc[0]
    assert done["tags.vaebench.dataset_source"] == str(folder)
    # one class: clustering scores would all be 1; they are absent, as not applicable
    assert done["metrics.test/elbo"] < 0 and "metrics.test/recon_mse" in done
    for key in ("metrics.test/kmeans_acc", "metrics.test/probe_acc", "metrics.baseline/kmeans_acc"):
        assert key not in done or done.isna()[key], key
    assert "test/kmeans_acc" in done["tags.vaebench.not_applicable"].split(",")


def test_a_study_deleted_in_mlflow_is_restored_and_the_user_told(tiny_file: Path) -> None:
    assert run_experiment(load_experiment(tiny_file), progress=False, echo=lambda s: None).exit_code == 0
    exp = load_experiment(tiny_file)
    client = mlflow.MlflowClient(exp.resolved_tracking_uri())
    client.delete_experiment(client.get_experiment_by_name("tiny").experiment_id)  # the UI's delete
    # the report, built meanwhile, says why it has no runs (it used to say only "not run yet")
    from vaebench.report import build_report

    text = html.unescape(" ".join(build_report(exp).read_text(encoding="utf-8").split()))
    assert "the experiment is in MLflow's trash, its runs not read: `vaebench run` restores it" in text
    lines: list[str] = []
    summary = run_experiment(exp, progress=False, echo=lines.append)
    assert "experiment 'tiny' had been deleted in MLflow (it was in the trash): restored" in lines[0]
    assert len(summary.of("skipped")) == 2
    assert client.get_experiment_by_name("tiny").lifecycle_stage == "active"
    lines.clear()
    run_experiment(exp, progress=False, echo=lines.append)
    assert not any("had been deleted" in line for line in lines), lines  # said once, when it happened


RESUMABLE = """
name: tiny
defaults: {dataset: digits, model: vae, epochs: 30, batch_size: 16, max_train_samples: 320, latent_dim: 2,
           arch_options: {mlp: {hidden: [32]}}}
evaluate: {iw_samples: 4, clustering: false, figures: false}
matrix:
  beta: [1.0]
"""


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(write_yaml, tmp_path: Path) -> None:
    path = write_yaml(RESUMABLE)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vaebench", "run", str(path), "--no-progress"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = lambda: list((tmp_path / "mlartifacts").glob("**/checkpoints/last.pt"))
    deadline = time.time() + 120
    while time.time() < deadline and not checkpoints():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: the run stays RUNNING
    proc.wait(timeout=30)
    assert checkpoints(), "no checkpoint was written before the kill"

    cells, parents = child_runs(path)
    assert list(cells["status"]) == ["RUNNING"] and list(parents["status"]) == ["RUNNING"]
    killed_at = torch.load(checkpoints()[0], weights_only=True)["epoch"]
    assert 0 <= killed_at < 29

    summary = run_experiment(load_experiment(path), progress=False, echo=lambda s: None)
    assert len(summary.of("resumed")) == 1
    # the dead process's sweep is ended (it used to stay RUNNING forever), the new one finished
    cells, parents = child_runs(path)
    assert sorted(parents["status"]) == ["FINISHED", "KILLED"]
    assert list(parents[parents["status"] == "KILLED"]["tags.vaebench.ended"]) == ["its process was gone"]
    assert len(cells) == 1 and list(cells["status"]) == ["FINISHED"]
    run_id = cells["run_id"].iloc[0]
    assert int(cells["tags.vaebench.resumed_from_epoch"].iloc[0]) >= killed_at
    steps = sorted(m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "train/loss"))
    assert steps == list(range(30)), "every epoch logged exactly once"


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "interrupted"),
                                              (signal.SIGTERM, 143, "stopped by SIGTERM")], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_marks_the_run_killed_and_exits_128_plus_the_signal(write_yaml, tmp_path: Path, sig: int,
                                                                              code: int, said: str) -> None:
    """A scheduler's SIGTERM (Slurm, Kubernetes, `timeout`) stops the sweep as Ctrl-C does: at the
    end of the batch, the run KILLED with its checkpoint, resumable."""
    path = write_yaml(RESUMABLE)
    proc = subprocess.Popen([sys.executable, "-m", "vaebench", "run", str(path), "--no-progress"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "mlartifacts").glob("**/checkpoints/last.pt")):
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "stopping at the end of the current batch" in err
    assert f"{said}: finished cells are kept; run the same command again to resume" in err
    cells, parents = child_runs(path)
    assert list(cells["status"]) == ["KILLED"] and list(parents["status"]) == ["KILLED"]
    summary = run_experiment(load_experiment(path), progress=False, echo=lambda s: None)
    assert len(summary.of("resumed")) == 1


def test_a_pool_worker_told_to_terminate_exits_after_its_grace_even_when_busy() -> None:
    """A pool that terminates its workers (one of them was killed) joins them: a worker that only
    took SIGTERM as a request to stop would keep it waiting forever."""
    code = ("import time; from vaebench.lifetime import exit_after_grace; "
            "exit_after_grace(15, seconds=0.5); time.sleep(60)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 143, proc.stderr  # the grace ended it, not the sleep (which exits 0)


@pytest.mark.slow
@pytest.mark.parametrize("to", ["group", "main"])
def test_a_sigterm_stops_every_worker_cleanly(write_yaml, tmp_path: Path, to: str) -> None:
    """A scheduler's SIGTERM to the process group, workers included (Slurm, systemd), or to the main
    process alone (`kill PID`, Kubernetes): each worker stops at its next batch (as on Ctrl-C), so
    both cells end KILLED with their checkpoints and resume."""
    # epochs enough that neither worker ends before the other's first checkpoint (they start apart)
    path = write_yaml(RESUMABLE.replace("beta: [1.0]", "beta: [1.0, 2.0]").replace("epochs: 30", "epochs: 300"))
    proc = subprocess.Popen([sys.executable, "-m", "vaebench", "run", str(path), "--no-progress", "--jobs", "2"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and len(list((tmp_path / "mlartifacts").glob("**/checkpoints/last.pt"))) < 2:
        time.sleep(0.05)
    if to == "group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:  # the main process passes the stop on to its workers
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    cells, parents = child_runs(path)
    assert list(cells["status"]) == ["KILLED", "KILLED"] and list(parents["status"]) == ["KILLED"]
    summary = run_experiment(load_experiment(path), progress=False, echo=lambda s: None)
    assert len(summary.of("resumed")) == 2 and summary.exit_code == 0


@pytest.mark.slow
def test_parallel_workers_train_every_cell_once(write_yaml) -> None:
    path = write_yaml(TINY_FOUR)
    summary = run_experiment(load_experiment(path), jobs=2, progress=False, echo=lambda s: None)
    assert summary.exit_code == 0 and len(summary.of("trained")) == 4
    cells, parents = child_runs(path)
    assert len(cells) == 4 and set(cells["status"]) == {"FINISHED"}
    assert set(cells["tags.mlflow.parentRunId"]) == set(parents["run_id"])
    assert cells["metrics.test/recon_mse"].notna().all()
    again = run_experiment(load_experiment(path), jobs=2, progress=False, echo=lambda s: None)
    assert len(again.of("skipped")) == 4


TINY_FOUR = """
name: tiny
defaults: {dataset: digits, epochs: 1, max_train_samples: 128, arch_options: {mlp: {hidden: [16]}}}
evaluate: {iw_samples: 4, clustering: false, figures: false}
matrix:
  model: [ae, vae]
  latent_dim: [2, 3]
"""
