"""Numbers that are not numbers, and what happens to failed cells on the next run
(vaebench.attempts): a NaN injected into training fails its cell with the epoch on the run, the
next run leaves it failed (resuming would diverge again) and `--retry-failed` trains it afresh;
`--fail-fast` stops the sweep at the first failure, resumably. Real SQLite stores in tmp_path."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
import torch

from faultlib import checkpoints, interrupted_run, quiet, runs_of, study_file
from vaebench import cli, tracking
from vaebench.config import load_experiment
from vaebench.runner import run_experiment


def test_a_nan_in_training_fails_the_cell_at_its_epoch_and_is_not_resumed_blindly(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, exp, uri, _ = interrupted_run(tmp_path)  # a checkpoint after epoch 0, then stopped
    (killed,) = runs_of(uri)
    tracker = tracking.connect(uri, "faults")
    checkpoint = tracking.load_torch(tracker, killed.info.run_id, tracking.CHECKPOINT_PATH)
    assert checkpoint["epoch"] == 0
    # the NaN: every weight of the model the run resumes from (a checkpoint that verifies)
    checkpoint["model"] = {k: torch.full_like(v, math.nan) if v.is_floating_point() else v
                           for k, v in checkpoint["model"].items()}
    tracking.log_torch(tracker, killed.info.run_id, tracking.CHECKPOINT_PATH, checkpoint)

    summary = run_experiment(exp, progress=False, echo=quiet)
    assert summary.exit_code == 1
    (failed,) = summary.of("failed")
    assert "TrainingDiverged" in failed.error and "not finite at epoch 1" in failed.error
    (run,) = runs_of(uri)
    assert run.info.status == "FAILED" and run.info.run_id == killed.info.run_id
    assert run.data.tags[tracking.TAG_FAILURE] == "diverged"
    assert run.data.tags["vaebench.diverged_at_epoch"] == "1"
    assert "not finite at epoch 1" in run.data.tags[tracking.TAG_ERROR]

    # the next run does not resume it (it would diverge again from the same checkpoint)
    capsys.readouterr()
    assert cli.main(["run", str(path), "--no-progress", "--no-report"]) == 1
    out = capsys.readouterr().out
    assert "0 trained (0 resumed), 0 skipped (already finished), 1 failed (1 earlier, not retried)" in out
    assert "add --retry-failed" in out and run.info.run_id in out
    assert len(runs_of(uri)) == 1
    # nor does `evaluate` send the user to a plain `vaebench run`
    assert cli.main(["evaluate", str(path), "--no-report"]) == 0  # nothing to evaluate is no failure of its own
    out = capsys.readouterr().out
    assert f"no finished run to evaluate (failed earlier in run {run.info.run_id} (diverged)" in out
    assert "`vaebench run --retry-failed` trains it afresh" in out

    # --retry-failed: afresh, in a new run, which finishes; the diverged one stays as the record
    assert cli.main(["run", str(path), "--no-progress", "--no-report", "--retry-failed"]) == 0
    old, new = runs_of(uri)
    assert old.info.status == "FAILED" and new.info.status == "FINISHED"
    assert new.data.tags["vaebench.previous_attempt"] == old.info.run_id
    assert "vaebench.resumed_from_epoch" not in new.data.tags
    assert math.isfinite(new.data.metrics["test/elbo"])



def test_a_model_whose_test_metrics_are_not_finite_fails_as_diverged_and_keeps_what_was_measured(
        tmp_path: Path) -> None:
    """A training loss can stay finite (1e28 at a huge lr) while the model overflows on the test
    set: such a cell is diverged, not finished with NaN in the report."""
    _, exp, uri, _ = interrupted_run(tmp_path)
    (killed,) = runs_of(uri)
    tracker = tracking.connect(uri, "faults")
    checkpoint = tracking.load_torch(tracker, killed.info.run_id, tracking.CHECKPOINT_PATH)
    checkpoint["stopped_early"] = True  # nothing left to train: the run goes straight to its evaluation
    for weights in (checkpoint["model"], checkpoint["best_model"]):
        (bias,) = [k for k in weights if k.endswith("to_logvar.bias")]
        weights[bias] = torch.full_like(weights[bias], 1e4)  # exp(1e4): an infinite posterior variance
    tracking.log_torch(tracker, killed.info.run_id, tracking.CHECKPOINT_PATH, checkpoint)

    summary = run_experiment(exp, progress=False, echo=quiet)
    assert summary.exit_code == 1
    (failed,) = summary.of("failed")
    assert "TrainingDiverged" in failed.error and "test/elbo" in failed.error and "smaller lr" in failed.error
    (run,) = runs_of(uri)
    assert run.info.status == "FAILED" and run.data.tags[tracking.TAG_FAILURE] == "diverged"
    assert "test/elbo" in run.data.tags[tracking.TAG_ERROR]
    assert "test/recon_mse" in run.data.metrics  # what the evaluation measured is on the run
    # deterministic: the next run leaves it failed
    again = run_experiment(exp, progress=False, echo=quiet)
    assert [r.earlier for r in again.of("failed")] == [True] and len(runs_of(uri)) == 1


FAIL_FAST_STUDY = """
name: faults
defaults: {dataset: digits, model: vae, epochs: 2, batch_size: 16, max_train_samples: 160, latent_dim: 2,
           arch_options: {mlp: {hidden: [16]}}}
evaluate: {iw_samples: 4, clustering: false, figures: false}
matrix:
  beta: [1000000.0, 1.0, 2.0]
  lr: [10.0, 0.001]
exclude:
  - {beta: 1000000.0, lr: 0.001}
  - {beta: 1.0, lr: 10.0}
  - {beta: 2.0, lr: 10.0}
"""

FAIL_FIRST = """
include:
  - {beta: 1000000.0, lr: 10.0}
"""


def test_fail_fast_stops_the_sweep_at_the_first_failure_and_the_rest_resumes(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    # the diverging cell first (matrix order), then two good ones
    path = tmp_path / "experiments.yaml"
    path.write_text(FAIL_FAST_STUDY)
    uri = load_experiment(path).resolved_tracking_uri()
    assert cli.main(["run", str(path), "--no-progress", "--no-report", "--fail-fast", "--pack", "off"]) == 1
    out = capsys.readouterr().out
    assert "--fail-fast: a cell failed; stopping the sweep" in out
    assert "stopped at the first failure (--fail-fast): 2 cells not finished (not started, or stopped: KILLED)" in out
    (failed,) = runs_of(uri)
    assert failed.info.status == "FAILED" and failed.data.tags[tracking.TAG_FAILURE] == "diverged"
    assert failed.data.tags["vaebench.diverged_at_epoch"] == "0"
    (parent,) = runs_of(uri, kind="parent")
    assert parent.info.status == "FAILED"

    # the next run (no --fail-fast): the two others train; the diverged cell is left failed
    assert cli.main(["run", str(path), "--no-progress", "--no-report"]) == 1
    out = capsys.readouterr().out
    assert "2 trained (0 resumed), 0 skipped (already finished), 1 failed (1 earlier, not retried)" in out
    assert sorted(r.info.status for r in runs_of(uri)) == ["FAILED", "FINISHED", "FINISHED"]


def test_fail_fast_in_a_pack_stops_its_other_members_which_resume_later(tmp_path: Path) -> None:
    path = study_file(tmp_path, betas=[1.0, 2.0], epochs=3, extra=FAIL_FIRST)
    exp = load_experiment(path)
    uri = exp.resolved_tracking_uri()
    summary = run_experiment(exp, pack=3, fail_fast=True, progress=False, echo=quiet)  # one pack of three
    assert summary.exit_code == 1 and summary.not_run == 2
    statuses = {r.data.tags["beta"]: r.info.status for r in runs_of(uri)}
    assert statuses == {"1000000.0": "FAILED", "1.0": "KILLED", "2.0": "KILLED"}  # stopped at their next batch
    assert len(checkpoints(tmp_path)) == 2  # the good members, after epoch 0 (the other diverged in it)

    again = run_experiment(exp, pack=3, progress=False, echo=quiet)
    assert len(again.of("resumed")) == 2 and [r.earlier for r in again.of("failed")] == [True]
    client = mlflow.MlflowClient(uri)
    for run in runs_of(uri):
        if run.data.tags["beta"] != "1000000.0":
            assert run.info.status == "FINISHED"
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
            assert steps == [0, 1, 2]


@pytest.mark.slow
def test_fail_fast_with_worker_processes_stops_them_all_and_leaves_nothing_running(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "experiments.yaml"
    path.write_text(FAIL_FAST_STUDY.replace("epochs: 2", "epochs: 30"))
    uri = load_experiment(path).resolved_tracking_uri()
    assert cli.main(["run", str(path), "--no-progress", "--no-report", "--fail-fast", "--jobs", "2"]) == 1
    out = capsys.readouterr().out
    assert "--fail-fast: a cell failed; stopping the sweep" in out
    runs = runs_of(uri)
    assert "RUNNING" not in {r.info.status for r in runs}
    assert [r.data.tags["beta"] for r in runs if r.info.status == "FAILED"] == ["1000000.0"]
    assert runs_of(uri, kind="parent")[0].info.status == "FAILED"

    assert cli.main(["run", str(path), "--no-progress", "--no-report"]) == 1  # the rest, then done
    assert "1 failed (1 earlier, not retried)" in capsys.readouterr().out
    finished = [r.data.tags["beta"] for r in runs_of(uri) if r.info.status == "FINISHED"]
    assert sorted(finished) == ["1.0", "2.0"]
