"""Packed sweeps end to end through MLflow: every member is a cell in its own right (its own run,
params, curves, checkpoint), packing changes no result, a group resumes after a kill, a rerun
trains only the missing members, a diverging member fails alone, and evaluation in worker
processes logs what evaluation in place logs. Real SQLite stores in tmp_path, read back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from vaebench import cli
from vaebench.config import load_experiment
from vaebench.runner import run_experiment

STUDY = """
name: packs
seeds: [0, 1]
defaults:
  dataset: digits
  model: vae
  epochs: {epochs}
  batch_size: 32
  max_train_samples: 320
  latent_dim: 2
  arch_options: {{mlp: {{hidden: [32]}}}}
evaluate: {{iw_samples: 8, clustering: {clustering}, figures: {figures}, silhouette_samples: 50,
           probe_train_samples: 200, kmeans_restarts: 2}}
matrix:
  beta: [0.5, 2.0]
  reduction: [sum, mean]
"""


def study(write_yaml, epochs: int = 3, clustering: bool = False, figures: bool = False, name: str = "experiments.yaml",
          extra: str = "") -> Path:
    text = STUDY.format(epochs=epochs, clustering=str(clustering).lower(), figures=str(figures).lower()) + extra
    return write_yaml(text, name)


def cells_of(path: Path, name: str = "packs") -> pd.DataFrame:
    exp = load_experiment(path)
    mlflow.set_tracking_uri(exp.resolved_tracking_uri())
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # set_tracking_uri exports it: it would redirect later sweeps
    df = mlflow.search_runs(experiment_names=[name])
    return df[df["tags.vaebench.kind"] == "cell"].set_index("tags.mlflow.runName").sort_index()


def quiet(_: str) -> None:
    pass


def test_a_packed_sweep_logs_every_member_as_its_own_run_with_unchanged_results(write_yaml, tmp_path: Path) -> None:
    packed_file = study(write_yaml, clustering=True)
    summary = run_experiment(load_experiment(packed_file), pack=8, progress=False, echo=quiet)
    assert summary.exit_code == 0 and len(summary.of("trained")) == 8
    packed = cells_of(packed_file)
    assert len(packed) == 8 and set(packed["status"]) == {"FINISHED"}
    # one pack of 8: same id, size and member list on every run, the engine said
    assert packed["tags.vaebench.pack.id"].nunique() == 1
    assert set(packed["tags.vaebench.pack.size"]) == {"8"} and set(packed["tags.vaebench.engine"]) == {"packed"}
    assert set(packed["tags.vaebench.pack.members"].iloc[0].split(",")) == set(packed.index)
    assert set(packed["tags.vaebench.step"]) == {"eager"}  # compile: auto captures on CUDA only
    assert set(packed["tags.vaebench.float32"]) == {"fp32"}  # TF32 exists on CUDA only
    # each run has its own settings as params, its own per-epoch curve and checkpoint
    assert sorted(packed["params.beta"].unique()) == ["0.5", "2.0"] and set(packed["params.seed"]) == {"0", "1"}
    client = mlflow.MlflowClient()
    for run_id in packed["run_id"]:
        assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [0, 1, 2]
        assert {a.path for a in client.list_artifacts(run_id)} >= {"checkpoints", "model", "config"}

    # the report's header says how the runs were trained
    from vaebench.report import build_report

    html = build_report(load_experiment(packed_file)).read_text()
    assert "8 runs packed, eager (in 1 pack)" in html
    assert "<th>float32 math</th><td>fp32 (8 runs)</td>" in html

    # the same study one cell at a time, in another store: the same numbers
    alone_file = study(write_yaml, clustering=True, name="alone.yaml",
                       extra=f"tracking_uri: sqlite:///{tmp_path}/alone.db\n")
    assert run_experiment(load_experiment(alone_file), pack="off", progress=False, echo=quiet).exit_code == 0
    alone = cells_of(alone_file)
    assert set(alone["tags.vaebench.engine"]) == {"plain"}
    assert "8 runs alone, eager" in build_report(load_experiment(alone_file)).read_text()
    for metric in ("metrics.test/elbo", "metrics.test/nll_iw", "metrics.test/recon_mse", "metrics.train/loss",
                   "metrics.test/knn_acc", "metrics.baseline/knn_acc", "metrics.effective_beta"):
        pd.testing.assert_series_equal(packed[metric], alone[metric], rtol=1e-4, check_names=False)


def test_a_rerun_packs_only_the_members_still_missing(write_yaml) -> None:
    path = study(write_yaml)
    first = run_experiment(load_experiment(path), pack=8, only={"beta": [0.5]}, progress=False, echo=quiet)
    assert len(first.of("trained")) == 4
    again = run_experiment(load_experiment(path), pack=8, progress=False, echo=quiet)
    assert len(again.of("skipped")) == 4 and len(again.of("trained")) == 4
    cells = cells_of(path)
    assert len(cells) == 8 and set(cells["status"]) == {"FINISHED"}
    second = cells[cells["params.beta"] == "2.0"]
    assert set(second["tags.vaebench.pack.size"]) == {"4"} and second["tags.vaebench.pack.id"].nunique() == 1


def test_a_diverging_member_fails_alone_with_its_reason(write_yaml) -> None:
    path = study(write_yaml, epochs=4, extra="include:\n  - {beta: 1000000.0, lr: 10.0, reduction: sum}\n")
    summary = run_experiment(load_experiment(path), pack=16, progress=False, echo=quiet)
    assert summary.exit_code == 1
    bad = summary.of("failed")  # the include entry, once per seed
    assert len(bad) == 2 and {b.spec.settings.seed for b in bad} == {0, 1}
    assert all(b.spec.settings.lr == 10.0 and "TrainingDiverged" in b.error and "not finite at epoch 0" in b.error
               for b in bad)
    assert len(summary.of("trained")) == 8
    cells = cells_of(path)
    failed = cells[cells["status"] == "FAILED"]
    assert len(failed) == 2
    assert failed["tags.vaebench.error"].str.contains("not finite").all()
    assert set(cells[cells["status"] == "FINISHED"]["tags.vaebench.pack.size"]) == {"10"}


def test_members_stop_early_each_on_their_own(write_yaml) -> None:
    path = study(write_yaml, epochs=15, extra="include:\n  - {beta: 1.0, lr: 0.05, patience: 2}\n")
    assert run_experiment(load_experiment(path), pack=16, progress=False, echo=quiet).exit_code == 0
    cells = cells_of(path)
    stopped = cells[cells["tags.vaebench.stopped_early"] == "True"]
    assert not stopped.empty and (stopped["params.lr"] == "0.05").all()
    assert (stopped["metrics.train/epochs_run"] < 15).all()
    full = cells[cells["params.lr"] != "0.05"]
    assert (full["metrics.train/epochs_run"] == 15).all()


def test_evaluation_in_worker_processes_logs_what_evaluation_in_place_logs(write_yaml, tmp_path: Path) -> None:
    pooled_file = study(write_yaml, clustering=True, figures=True, extra="exclude:\n  - {reduction: mean}\n")
    summary = run_experiment(load_experiment(pooled_file), pack=4, eval_workers=2, progress=False, echo=quiet)
    assert summary.exit_code == 0 and len(summary.of("trained")) == 4
    inline_file = study(write_yaml, clustering=True, figures=True, name="inline.yaml",
                        extra=f"exclude:\n  - {{reduction: mean}}\ntracking_uri: sqlite:///{tmp_path}/inline.db\n")
    assert run_experiment(load_experiment(inline_file), pack=4, eval_workers=0, progress=False, echo=quiet).exit_code == 0
    pooled, inline = cells_of(pooled_file), cells_of(inline_file)
    assert set(pooled["status"]) == {"FINISHED"}
    metrics = sorted(c for c in inline.columns if c.startswith(("metrics.test/", "metrics.baseline/")))
    assert "metrics.test/kmeans_acc" in metrics and "metrics.baseline/nmi" in metrics
    pd.testing.assert_frame_equal(pooled[metrics], inline[metrics], rtol=1e-6)
    client = mlflow.MlflowClient(load_experiment(pooled_file).resolved_tracking_uri())
    for run_id in pooled["run_id"]:
        figures = {a.path for a in client.list_artifacts(run_id, "figures")}
        assert "figures/latent_scatter.png" in figures and "figures/samples.png" in figures



def test_a_cell_evaluated_in_a_worker_ends_while_the_next_unit_trains(write_yaml) -> None:
    """A cell's run ends FINISHED (in the MLflow UI) as soon as its evaluation in a worker process
    is done and its writes are through, not only once the unit training after it ends: the trainer
    looks in on the evaluator after every epoch. Cell 1 trains 2 epochs, cell 2 long enough for cell
    1's evaluation to finish meanwhile."""
    text = STUDY.format(epochs=2, clustering="false", figures="false").replace("seeds: [0, 1]", "seeds: [0]")
    path = write_yaml(text + "exclude:\n  - {reduction: mean}\n  - {beta: 2.0}\n"
                             "include:\n  - {beta: 1.0, reduction: sum, epochs: 800}\n")
    exp = load_experiment(path)
    summary = run_experiment(exp, pack="off", eval_workers="1", progress=False, echo=quiet)
    assert summary.exit_code == 0 and len(summary.of("trained")) == 2
    client = mlflow.MlflowClient(exp.resolved_tracking_uri())
    first, second = sorted((client.get_run(r.run_id) for r in summary.results), key=lambda r: r.info.start_time)
    last_epoch = max(m.timestamp for m in client.get_metric_history(second.info.run_id, "train/loss"))
    assert first.info.status == "FINISHED" and first.info.end_time < last_epoch


def test_pack_option_is_checked_on_the_command_line(tiny_file: Path, capsys) -> None:
    assert cli.main(["run", str(tiny_file), "--pack", "many"]) == 2
    assert "expected auto, off or a number" in capsys.readouterr().err
    assert cli.main(["run", str(tiny_file), "--eval-workers", "-1"]) == 2


@pytest.mark.slow
def test_a_killed_group_resumes_each_member_from_its_own_checkpoint(write_yaml, tmp_path: Path) -> None:
    EPOCHS = 300  # enough that the kill, a second after the first checkpoints, comes before the end
    path = study(write_yaml, epochs=EPOCHS)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vaebench", "run", str(path), "--pack", "8", "--no-progress"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = lambda: list((tmp_path / "mlartifacts").glob("**/checkpoints/last.pt"))
    deadline = time.time() + 180
    while time.time() < deadline and len(checkpoints()) < 8:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: the runs stay RUNNING
    proc.wait(timeout=30)
    assert len(checkpoints()) == 8, "every member writes its own checkpoint after its first epoch"
    assert set(cells_of(path)["status"]) == {"RUNNING"}
    epochs = {torch.load(p, weights_only=True)["epoch"] for p in checkpoints()}
    assert max(epochs) < EPOCHS - 1, "killed before the end"

    summary = run_experiment(load_experiment(path), pack=8, progress=False, echo=quiet)
    assert len(summary.of("resumed")) == 8 and summary.exit_code == 0
    cells = cells_of(path)
    assert len(cells) == 8 and set(cells["status"]) == {"FINISHED"}
    assert cells["tags.vaebench.resumed_from_epoch"].notna().all()
    client = mlflow.MlflowClient()
    for run_id in cells["run_id"]:
        steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
        assert steps == list(range(EPOCHS)), "every epoch logged exactly once"



def test_compile_off_is_taken_as_written_in_the_file_and_in_only(write_yaml) -> None:
    path = study(write_yaml, epochs=1, extra="include:\n  - {compile: off, beta: 8.0}\n")
    exp = load_experiment(path)
    from vaebench.matrix import expand
    from vaebench.runner import parse_only, select

    (cell,) = select(expand(exp), parse_only(["compile=off", "seed=0"]))
    assert cell.settings.compile == "off" and cell.settings.beta == 8.0
