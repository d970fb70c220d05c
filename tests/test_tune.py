"""`vaebench tune` end to end on tiny data: trials as MLflow children of the study run, pruning,
resume after a kill, --export round trip, multi-objective Pareto fronts, --jobs workers, and the
config errors of a bad `tune:` section. Every test has its own MLflow store and Optuna storage in
tmp_path."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from vaebench import cli, tracking
from vaebench.config import ConfigError, load_experiment
from vaebench.matrix import expand
from vaebench.tune import decoded_params, make_plan, open_study, trial_settings, tune_experiment

BASE = """
name: tiny
seeds: [0]
defaults:
  dataset: digits
  epochs: {epochs}
  batch_size: 64
  max_train_samples: 256
  latent_dim: 2
  arch_options:
    mlp: {{hidden: [32]}}
evaluate: {{iw_samples: 4, clustering: false, figures: false}}
matrix:
  model: [ae, vae]
"""


def experiment_file(write_yaml, tune: str, epochs: int = 2, name: str = "experiments.yaml") -> Path:
    return write_yaml(BASE.format(epochs=epochs) + "tune:\n" + textwrap.indent(textwrap.dedent(tune).strip(), "  ")
                      + "\n", name)


@pytest.fixture(scope="module")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Creating MLflow's tables takes seconds; copy an empty, migrated store into each test instead.
    path = tmp_path_factory.mktemp("template") / "mlruns.db"
    tracking.connect("sqlite:///" + str(path), "template")
    return path


@pytest.fixture(autouse=True)
def _store(tmp_path: Path, mlflow_template: Path) -> None:
    shutil.copy(mlflow_template, tmp_path / "mlruns.db")


def quiet(lines: list[str] | None = None):
    return (lines.append if lines is not None else (lambda s: None))


def runs_of(path: Path) -> pd.DataFrame:
    exp = load_experiment(path)
    mlflow.set_tracking_uri(exp.resolved_tracking_uri())
    return mlflow.search_runs(experiment_names=[exp.name])


def study_of(path: Path) -> optuna.Study:
    exp = load_experiment(path)
    return open_study(make_plan(exp, None, None))


LR_SPACE = """
cell: {model: vae}
metric: test/elbo
direction: maximize
sampler: random
seed: 0
pruner: none
space:
  lr: {low: 1.0e-3, high: 1.0e-2, log: true}
  beta: {low: 0.5, high: 2.0}
"""


def test_trials_are_children_of_the_study_run(write_yaml, tmp_path: Path) -> None:
    path = experiment_file(write_yaml, LR_SPACE + "n_trials: 3\n")
    lines: list[str] = []
    assert tune_experiment(load_experiment(path), echo=lines.append) == 0

    study = study_of(path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert study.study_name == "tiny-tune"
    assert (tmp_path / "optuna.db").exists()  # default storage: next to the MLflow store
    df = runs_of(path)
    parents = df[df["tags.vaebench.kind"] == "study"]
    trials = df[df["tags.vaebench.kind"] == "trial"]
    assert len(parents) == 1 and len(trials) == 3
    parent = parents.iloc[0]
    assert parent["tags.optuna.study_name"] == "tiny-tune"
    assert parent["tags.optuna.storage"] == "sqlite:///" + str(tmp_path / "optuna.db")
    assert parent["status"] == "FINISHED" and parent["metrics.trials/complete"] == 3
    assert set(trials["tags.mlflow.parentRunId"]) == {parent["run_id"]}
    assert set(trials["tags.optuna.study_name"]) == {"tiny-tune"}
    assert sorted(trials["tags.vaebench.trial_number"].astype(int)) == [0, 1, 2]
    assert set(trials["status"]) == {"FINISHED"} and set(trials["tags.vaebench.trial_state"]) == {"COMPLETE"}
    # every setting is a param; the sampled ones are the trial's params
    by_number = trials.set_index(trials["tags.vaebench.trial_number"].astype(int))
    for t in study.trials:
        row = by_number.loc[t.number]
        assert float(row["params.lr"]) == pytest.approx(t.params["lr"])
        assert float(row["params.beta"]) == pytest.approx(t.params["beta"])
        assert row["params.model"] == "vae" and row["params.dataset"] == "digits"
        assert row["metrics.test/elbo"] == pytest.approx(t.value)
        assert row["tags.vaebench.run_key"] == t.user_attrs["run_key"]
        assert row["run_id"] == t.user_attrs["mlflow_run_id"]
    # per-epoch curves, and the best trial tagged
    history = mlflow.MlflowClient().get_metric_history(by_number.loc[0]["run_id"], "val/loss")
    assert sorted(m.step for m in history) == [0, 1]
    best = trials[trials["tags.vaebench.best"] == "true"]
    assert list(best["tags.vaebench.trial_number"].astype(int)) == [study.best_trial.number]
    assert sum(line.startswith("trial ") and "COMPLETE" in line for line in lines) == 3
    assert any(line.startswith(f"best trial {study.best_trial.number}: test/elbo") for line in lines)


PRUNING = """
cell: {model: vae}
metric: test/elbo
direction: maximize
n_trials: 3
pruner: median
pruner_options: {n_startup_trials: 2}
space:
  lr: {choices: [0.01, 0.005, 1.0e-7]}
enqueue:             # a deterministic order: two sane trials, then an absurdly small lr
  - {lr: 0.01}
  - {lr: 0.005}
  - {lr: 1.0e-7}
"""


def test_pruning_prunes_a_clearly_worse_trial(write_yaml) -> None:
    path = experiment_file(write_yaml, PRUNING, epochs=4)
    lines: list[str] = []
    assert tune_experiment(load_experiment(path), echo=lines.append) == 0

    study = study_of(path)
    assert [t.params["lr"] for t in study.trials] == [0.01, 0.005, 1.0e-7]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    pruned = study.trials[2]
    assert pruned.user_attrs["pruned_at_epoch"] < 3  # stopped before the last epoch
    df = runs_of(path)
    row = df[df["run_id"] == pruned.user_attrs["mlflow_run_id"]].iloc[0]
    assert row["status"] == "KILLED" and row["tags.vaebench.trial_state"] == "PRUNED"
    assert pd.isna(row.get("metrics.test/elbo"))  # never evaluated
    # its curve so far stays visible
    curve = mlflow.MlflowClient().get_metric_history(row["run_id"], "val/neg_elbo")
    assert sorted(m.step for m in curve) == list(range(pruned.user_attrs["pruned_at_epoch"] + 1))
    assert any(line.startswith("trial 2 PRUNED") for line in lines)
    # the pruner saw -val/neg_elbo (the study maximises the ELBO)
    assert pruned.intermediate_values[0] < min(t.intermediate_values[0] for t in study.trials[:2])
    # the report gives it no objective value: Optuna's value for it is -val/neg_elbo at its last epoch
    from vaebench.report.collect import collect

    (reported,) = collect(load_experiment(path)).studies
    values = reported.trials.set_index("number")["value 0"]
    assert pruned.value is not None and pd.isna(values[2]) and values[[0, 1]].notna().all()


def _orphan(path: Path) -> int:
    """A trial left RUNNING by a process that no longer exists, with its MLflow run RUNNING."""
    exp = load_experiment(path)
    study = study_of(path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with warnings.catch_warnings():  # the storage has heartbeats; this trial never beats
        warnings.simplefilter("ignore")
        trial = study.ask()
    tracker = tracking.connect(exp.resolved_tracking_uri(), exp.name)
    run_id = tracking.start_run(tracker, "orphan", {tracking.TAG_KIND: "trial"})
    trial.set_user_attr("worker", f"{platform.node()}:{dead.pid}")
    trial.set_user_attr("mlflow_run_id", run_id)
    return trial.number


def test_resume_runs_only_the_missing_trials(write_yaml) -> None:
    path = experiment_file(write_yaml, LR_SPACE)
    exp = load_experiment(path)
    assert tune_experiment(exp, n_trials=2, echo=quiet()) == 0
    first = {t.number: t.params for t in study_of(path).trials}
    orphan = _orphan(path)

    lines: list[str] = []
    assert tune_experiment(exp, n_trials=4, echo=lines.append) == 0
    study = study_of(path)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 4
    assert {t.number: t.params for t in complete if t.number in first} == first  # kept, not rerun
    assert len({t.params["lr"] for t in complete}) == 4  # a resumed seed does not replay suggestions
    assert study.trials[orphan].state == TrialState.FAIL
    assert any(f"trial {orphan}: its process" in line for line in lines)
    df = runs_of(path)
    assert df[df["tags.mlflow.runName"] == "orphan"]["status"].tolist() == ["FAILED"]
    assert len(df[df["tags.vaebench.kind"] == "study"]) == 1  # one parent run per study, reused
    # nothing left to do: a third call runs no trial
    assert tune_experiment(exp, n_trials=4, echo=quiet()) == 0
    assert len(study_of(path).trials) == len(study.trials)


def trial_states(db: Path) -> list[str]:
    """Trial states in number order, read straight from the SQLite file ([] until it exists)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return [state for (state,) in conn.execute("SELECT state FROM trials ORDER BY number")]
    except sqlite3.Error:
        return []


@pytest.mark.slow
@pytest.mark.parametrize("jobs, to, sig", [(1, "main", signal.SIGTERM), (2, "group", signal.SIGTERM),
                                           (2, "main", signal.SIGTERM), (2, "group", signal.SIGINT)],
                         ids=["1-main-TERM", "2-group-TERM", "2-main-TERM", "2-group-INT"])
def test_sigterm_ends_the_running_trials_as_ctrl_c_does(write_yaml, tmp_path: Path, jobs: int, to: str,
                                                        sig: int) -> None:
    """A scheduler's SIGTERM (to the whole process group, or `kill PID` to the main process alone):
    each trial in progress is recorded (Optuna FAIL, its MLflow run KILLED and tagged), not left
    RUNNING for the next start to clean up, and no worker starts another; exit code 143; a rerun
    finishes the study."""
    path = experiment_file(write_yaml, LR_SPACE + "n_trials: 2\n", epochs=150)
    proc = subprocess.Popen([sys.executable, "-m", "vaebench", "tune", str(path), "--jobs", str(jobs)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    states: list[str] = []
    # one process: inside its second trial; two: inside the first trial of each
    while time.time() < deadline and (states[1:] != ["RUNNING"] if jobs == 1 else states != ["RUNNING"] * 2):
        time.sleep(0.1)
        states = trial_states(tmp_path / "optuna.db")
    time.sleep(0.5)
    if to == "main":
        proc.send_signal(sig)
    else:  # a terminal's Ctrl-C reaches the whole group: the main process then terminates its workers too
        os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    said = "stopped by SIGTERM" if sig == signal.SIGTERM else "interrupted"
    assert f"{said}: finished trials are kept" in err and "Traceback" not in err and "OSError" not in err, err
    stopped = ["COMPLETE", "FAIL"] if jobs == 1 else ["FAIL", "FAIL"]
    assert trial_states(tmp_path / "optuna.db") == stopped
    trials = runs_of(path)
    trials = trials[trials["tags.vaebench.kind"] == "trial"].sort_values("tags.vaebench.trial_number")
    assert list(trials["status"]) == ["FINISHED" if s == "COMPLETE" else "KILLED" for s in stopped]
    assert list(trials["tags.vaebench.error"].fillna("")) == ["" if s == "COMPLETE" else "interrupted" for s in stopped]
    assert tune_experiment(load_experiment(path), echo=quiet()) == 0
    assert trial_states(tmp_path / "optuna.db").count("COMPLETE") == 2


@pytest.mark.slow
def test_killed_process_resumes_from_storage(write_yaml, tmp_path: Path) -> None:
    # a trial long enough (seconds) that the kill lands inside it, however fast the machine trains
    path = experiment_file(write_yaml, LR_SPACE + "n_trials: 2\n", epochs=150)
    proc = subprocess.Popen([sys.executable, "-m", "vaebench", "tune", str(path)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    states: list[str] = []
    # Poll the storage read-only (opening it through Optuna could race the child creating its tables).
    while time.time() < deadline and "RUNNING" not in states[1:]:  # kill it inside the second trial
        time.sleep(0.1)
        states = trial_states(tmp_path / "optuna.db")
    time.sleep(0.5)  # well into its epochs (a trial takes seconds)
    states = trial_states(tmp_path / "optuna.db")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert states[:1] == ["COMPLETE"] and states[1:] == ["RUNNING"], f"not killed mid-trial: {states}"
    killed = study_of(path)
    finished = {t.number: t.params for t in killed.get_trials(states=(TrialState.COMPLETE,))}

    assert tune_experiment(load_experiment(path), echo=quiet()) == 0
    study = study_of(path)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 2
    assert {t.number: t.params for t in complete if t.number in finished} == finished
    assert study.trials[1].state == TrialState.FAIL  # the killed one: not counted, not rerun
    assert [t.number for t in complete] == [0, 2]
    df = runs_of(path)
    trials = df[df["tags.vaebench.kind"] == "trial"]
    assert sorted(trials["status"]) == ["FAILED", "FINISHED", "FINISHED"]
    assert len(df[df["tags.vaebench.kind"] == "study"]) == 1


def test_export_reproduces_the_best_trial(write_yaml, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = experiment_file(write_yaml, LR_SPACE + "n_trials: 3\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # not a file: refused before any trial, not after the study
    assert cli.main(["tune", str(path), "--export", str(fifo)]) == 2
    assert "--export" in capsys.readouterr().err and not (tmp_path / "optuna.db").exists()
    before = path.read_text()  # the experiments file itself: the study's definition would be lost
    assert cli.main(["tune", str(path), "--export", str(path)]) == 2
    assert "is the experiments file, which this would overwrite" in capsys.readouterr().err
    assert path.read_text() == before and not (tmp_path / "optuna.db").exists()
    out = tmp_path / "out" / "best.yaml"
    assert cli.main(["tune", str(path), "--export", str(out)]) == 0
    said = capsys.readouterr().out
    assert str(out) in said and "report written to" in said
    folder = tmp_path / "folder"  # a folder: <name>-best.yaml inside it (the study is done: no trial runs)
    folder.mkdir()
    assert cli.main(["tune", str(path), "--export", str(folder), "--no-report"]) == 0
    assert "report written to" not in capsys.readouterr().out
    assert (folder / "tiny-best.yaml").read_text().split("\n", 2)[2] == out.read_text().split("\n", 2)[2]

    exp = load_experiment(path)
    study = study_of(path)
    best = study.best_trial
    best_settings = trial_settings(make_plan(exp, None, None), best.params)
    exported = load_experiment(out)
    assert exported.name == "tiny-best" and exported.tune is None
    specs = expand(exported)
    assert len(specs) == 1
    assert specs[0].settings == best_settings
    df = runs_of(path)
    best_run = df[df["run_id"] == best.user_attrs["mlflow_run_id"]].iloc[0]
    assert best_run["tags.vaebench.best"] == "true"
    assert specs[0].key == best_run["tags.vaebench.run_key"]
    # and `vaebench run` trains it into the same store (the exported file points there)
    assert cli.main(["run", str(out), "--no-progress"]) == 0
    rerun = mlflow.search_runs(experiment_names=["tiny-best"])
    cell = rerun[rerun["tags.vaebench.kind"] == "cell"].iloc[0]
    assert cell["tags.vaebench.run_key"] == specs[0].key
    assert cell["metrics.test/elbo"] == pytest.approx(best.value, rel=1e-4)
    # the file edited under the same study: the resumed study says it mixes two settings, and the
    # export, which would train something else than the best trial did, is refused
    path.write_text(path.read_text().replace("max_train_samples: 256", "max_train_samples: 192"))
    capsys.readouterr()
    assert cli.main(["tune", str(path), "--export", str(tmp_path / "again.yaml")]) == 1
    out = capsys.readouterr().out
    assert "warning: 3 of the study's finished trials were trained with settings this file no longer gives" in out
    assert f"not exported: the best trial ({best.number}) was trained with settings" in out
    assert not (tmp_path / "again.yaml").exists()


def test_multi_objective_keeps_a_pareto_front(write_yaml) -> None:
    path = experiment_file(write_yaml, """
        cell: {model: vae}
        metrics: [test/elbo, test/recon_mse]
        directions: [maximize, minimize]
        sampler: random
        seed: 1
        n_trials: 3
        space:
          lr: {low: 1.0e-3, high: 1.0e-2, log: true}
          latent_dim: {low: 2, high: 6, step: 2}
        """)
    lines: list[str] = []
    assert tune_experiment(load_experiment(path), echo=lines.append) == 0
    study = study_of(path)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    front = study.best_trials
    assert len(front) >= 1 and all(len(t.values) == 2 for t in front)
    assert all(t.params["latent_dim"] in (2, 4, 6) for t in study.trials)
    assert any(line.startswith(f"Pareto front: {len(front)} trials") for line in lines)
    df = runs_of(path)
    parent = df[df["tags.vaebench.kind"] == "study"].iloc[0]
    assert parent["tags.vaebench.directions"] == "maximize,minimize"
    assert parent["tags.vaebench.pruner"] == "none"
    tagged = set(df[df["tags.vaebench.best"] == "true"]["run_id"])
    assert tagged == {t.user_attrs["mlflow_run_id"] for t in front}


def test_grid_over_list_choices_runs_every_point_once(write_yaml) -> None:
    path = experiment_file(write_yaml, """
        cell: {model: vae}
        metric: val/neg_elbo
        direction: minimize
        sampler: grid
        space:
          arch_options.mlp.hidden: {choices: [[16], [32, 16]]}
        """)
    exp = load_experiment(path)
    assert tune_experiment(exp, echo=quiet()) == 0  # n_trials defaults to the grid's size
    study = study_of(path)
    plan = make_plan(exp, None, None)
    assert sorted(t.params["arch_options.mlp.hidden"] for t in study.trials) == ["[16]", "[32, 16]"]  # JSON in Optuna
    hidden = sorted(trial_settings(plan, decoded_params(plan, t)).arch_config["hidden"] for t in study.trials)
    assert hidden == [[16], [32, 16]]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    df = runs_of(path)
    assert sorted(df["params.arch_options.mlp.hidden"].dropna()) == ["[16]", "[32, 16]"]
    assert tune_experiment(exp, echo=quiet()) == 0 and len(study_of(path).trials) == 2  # done


def test_a_study_with_other_directions_is_not_silently_reused(write_yaml, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    path = experiment_file(write_yaml, GOOD_TUNE)
    optuna.create_study(storage="sqlite:///" + str(tmp_path / "optuna.db"), study_name="tiny-tune",
                        direction="minimize")
    assert cli.main(["tune", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'tiny-tune'" in err and "['minimize']" in err and "tune.study_name" in err


def test_a_metric_the_model_does_not_compute_stops_the_study(write_yaml, tmp_path: Path) -> None:
    # the file cannot tell: a clustering score of a folder of one class (no labels to cluster by)
    from PIL import Image

    for i in range(12):
        Image.fromarray(np.full((8, 8), 20 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    path = write_yaml(f"""
        name: tiny
        defaults: {{dataset: image_folder, dataset_options: {{image_folder: {{path: {tmp_path}, channels: 1}}}},
                   epochs: 1, latent_dim: 2, arch_options: {{mlp: {{hidden: [16]}}}}}}
        evaluate: {{iw_samples: 4, figures: false}}
        matrix: {{model: [vae]}}
        tune:
          metric: test/nmi
          direction: maximize
          n_trials: 3
          space:
            lr: {{low: 1.0e-3, high: 1.0e-2}}
        """)
    lines: list[str] = []
    assert tune_experiment(load_experiment(path), echo=lines.append) == 1
    study = study_of(path)
    assert [t.state for t in study.trials] == [TrialState.FAIL]
    assert "test/nmi was not computed" in study.trials[0].user_attrs["error"]
    assert "evaluate.clustering True" in lines[1]


@pytest.mark.slow
def test_two_workers_share_one_study(write_yaml) -> None:
    path = experiment_file(write_yaml, LR_SPACE + "n_trials: 4\n")
    lines: list[str] = []
    assert tune_experiment(load_experiment(path), n_jobs=2, echo=lines.append) == 0
    study = study_of(path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    df = runs_of(path)
    trials = df[df["tags.vaebench.kind"] == "trial"]
    parent = df[df["tags.vaebench.kind"] == "study"]["run_id"].iloc[0]
    assert len(trials) == 4 and set(trials["tags.mlflow.parentRunId"]) == {parent}
    # one MLflow run per trial, none twice: Optuna hands each trial to one worker
    assert sorted(trials["tags.vaebench.trial_number"].astype(int)) == [0, 1, 2, 3]
    assert set(trials["run_id"]) == {t.user_attrs["mlflow_run_id"] for t in study.trials}
    workers = set(trials["tags.vaebench.worker"])
    assert len(workers) == 2 and all(w.split(":")[-1] != str(os.getpid()) for w in workers)
    assert {line.split("]")[0] for line in lines if line.startswith("[worker")} == {"[worker 0", "[worker 1"}
    assert len({t.params["lr"] for t in study.trials}) == 4  # the workers' samplers differ


# --- bad tune sections -------------------------------------------------------------------------

GOOD_TUNE = """
cell: {model: vae}
metric: test/elbo
direction: maximize
space:
  lr: {low: 1.0e-4, high: 1.0e-2, log: true}
"""


def _space(line: str) -> str:
    return f"cell: {{model: vae}}\nmetric: test/elbo\ndirection: maximize\nspace:\n  {line}"


MULTI_WITH_PRUNER = """
cell: {model: vae}
metrics: [test/elbo, test/recon_mse]
directions: [maximize, minimize]
pruner: median
space:
  lr: {low: 0.001, high: 0.01}
"""
BAD_TUNE = [
    pytest.param(_space("learning_rate: {low: 0.1, high: 1}"),
                 ":19: tune.space.learning_rate: unknown setting 'learning_rate'; allowed: dataset",
                 id="unknown-setting"),
    pytest.param(_space("lr: {low: 0.1, high: 0.01}"),
                 ":19: tune.space.lr.low: 0.1 is greater than high (0.01)", id="low>high"),
    pytest.param(_space("beta: {choices: []}"), ":19: tune.space.beta.choices: empty list", id="empty-choices"),
    pytest.param(_space("lr: {lowe: 0.1, high: 1}"),
                 "tune.space.lr.lowe: unknown key 'lowe'; allowed: type, low, high, step, log, choices",
                 id="unknown-key"),
    pytest.param(MULTI_WITH_PRUNER, ":18: tune.pruner: Optuna does not support pruning for multi-objective studies",
                 id="multi-objective+pruner"),
    pytest.param(GOOD_TUNE + "sampler: annealing",
                 "tune.sampler: unknown sampler 'annealing'; allowed: tpe, random, grid", id="unknown-sampler"),
    pytest.param(GOOD_TUNE + "sampler: grid",
                 "tune.sampler: grid needs a categorical-only space (`choices`); these are ranges: lr",
                 id="grid-range"),
    pytest.param(GOOD_TUNE.replace("model: vae", "model: ae"),
                 "tune.metric: test/elbo is not defined for the deterministic model 'ae'", id="elbo-of-ae"),
    pytest.param(GOOD_TUNE.replace("cell: {model: vae}\n", ""),
                 "tune.cell: pick one matrix cell for the study: give a value for 'model'", id="no-cell"),
    pytest.param(GOOD_TUNE.replace("model: vae", "model: dae"),
                 "tune.cell.model: 'dae' is not a value of the matrix axis 'model'", id="cell-off-axis"),
    pytest.param(GOOD_TUNE.replace("test/elbo", "elbo"),
                 "tune.metric: 'elbo' is not a metric name; expected test/<name>", id="metric-name"),
    pytest.param(GOOD_TUNE.replace("direction: maximize\n", ""), "tune.metric: needs a `direction`",
                 id="no-direction"),
    pytest.param(GOOD_TUNE + "  latent_dim: {low: 2, high: 8.5}",
                 "tune.space.latent_dim.high: 8.5: latent_dim takes whole numbers", id="fractional-int"),
    pytest.param(GOOD_TUNE + "  arch_options.conv.channels: {choices: [[8], [16]]}",
                 "tune.space.arch_options.conv.channels: has no effect: the cell's arch is 'mlp'", id="other-arch"),
    pytest.param(GOOD_TUNE.replace("cell: {model: vae}", "cell: {}") + "  model: {choices: [vae, iwae]}\n  family_options.beta_tcvae.alpha: {low: 0.5, high: 2}",
                 "tune.space.family_options.beta_tcvae.alpha: has no effect: 'beta_tcvae' is not among the space's "
                 "model choices (vae, iwae)", id="other-family"),
    pytest.param(GOOD_TUNE + "  kl_anneal.schedule: {choices: [linear, sometimes]}",
                 "tune.space.kl_anneal.schedule.choices[1]: 'sometimes' is not a valid kl_anneal.schedule",
                 id="bad-choice"),
    pytest.param(GOOD_TUNE + "  beta: {low: 0.5, high: 2, step: 5}",
                 "tune.space.beta.step: 5 does not divide high - low (2 - 0.5); e.g. high: 0.5", id="step-too-big"),
    pytest.param(GOOD_TUNE + "  beta: {low: 0.5, high: 2, step: 0.4}",
                 "tune.space.beta.step: 0.4 does not divide high - low (2 - 0.5); e.g. high: 1.7", id="step-not-dividing"),
    pytest.param(GOOD_TUNE.replace("model: vae", "model: ae").replace("test/elbo", "val/kl").replace("maximize", "minimize"),
                 "tune.metric: val/kl is always 0 for 'ae' (no regulariser); use e.g. val/recon", id="val-kl-of-ae"),
    pytest.param(GOOD_TUNE + "  kl_anneal.epoch: {low: 0, high: 2}",
                 "tune.space.kl_anneal.epoch: 'kl_anneal.epoch' is not a setting path: kl_anneal has no key 'epoch'; "
                 "allowed: schedule, epochs, cycles, ratio", id="unknown-dotted-key"),
    pytest.param(_space("lr: {low: a, high: 0.1}"), ":19: tune.space.lr.low: 'a': Input should be a number",
                 id="text-for-a-number"),
    pytest.param(GOOD_TUNE + "enqueue:\n  - {lr: fast}",
                 "tune.enqueue[0].lr: 'fast' is not a number; the range is [0.0001, 0.01]", id="enqueue-text"),
    pytest.param(GOOD_TUNE + "pruner: none\nprune_on: val/loss",
                 "tune.prune_on: has no effect with pruner: none; remove it, or choose a pruner (median, hyperband)",
                 id="prune-on-without-pruner"),
    pytest.param(GOOD_TUNE + "pruner_options: {patience: 3}",
                 "tune.pruner_options.patience: unknown median option; allowed: n_startup_trials", id="pruner-option"),
    pytest.param(GOOD_TUNE + "prune_on: test/elbo",
                 "tune.prune_on: 'test/elbo': the pruner watches a per-epoch validation metric", id="prune-on-test"),
    pytest.param(GOOD_TUNE + "enqueue: [{lr: 1.0}]", "tune.enqueue[0].lr: 1.0 is outside [0.0001, 0.01]",
                 id="enqueue-outside"),
    pytest.param(GOOD_TUNE + "  latent_dim: {low: 2, high: 8}\nenqueue: [{lr: 1.0e-3, latent_dim: 3.5}]",
                 "tune.enqueue[0].latent_dim: 3.5: latent_dim takes whole numbers", id="enqueue-fractional-int"),
    pytest.param(GOOD_TUNE + "  arch_options.mlp.activation: {choices: [tanh]}\n"
                 "  arch_options.mlp: {choices: [{hidden: [8]}]}",
                 "tune.space.arch_options.mlp: overlaps 'arch_options.mlp.activation' in the space",
                 id="overlap-three-levels"),
    pytest.param(GOOD_TUNE.replace("test/elbo", "test/nope"),
                 "tune.metric: 'test/nope' is not a metric vaebench logs; test/ metrics: elbo, bpd", id="metric-unknown"),
    pytest.param(GOOD_TUNE + "prune_on: val/nope",
                 "tune.prune_on: 'val/nope' is not a metric vaebench logs; val/ metrics: loss, recon, kl, neg_elbo",
                 id="prune-on-unknown"),
    pytest.param(GOOD_TUNE.replace("test/elbo", "test/nmi"),  # BASE: evaluate.clustering false
                 "tune.metric: test/nmi is not measured: evaluate.clustering is false", id="metric-needs-clustering"),
    pytest.param(GOOD_TUNE.replace("test/elbo", "test/codebook_perplexity"),
                 "tune.metric: test/codebook_perplexity is logged by vq_vae runs only, not by 'vae'",
                 id="metric-of-another-family"),
]


@pytest.mark.parametrize("tune,expected", BAD_TUNE)
def test_bad_tune_sections_name_the_key(write_yaml, capsys: pytest.CaptureFixture, tune: str,
                                        expected: str) -> None:
    path = experiment_file(write_yaml, tune)
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert expected in str(info.value) and str(path) in str(info.value)
    assert cli.main(["tune", str(path)]) == 2
    err = capsys.readouterr().err
    assert "invalid experiments file" in err and expected in err


def test_tune_without_a_tune_section(write_yaml, capsys: pytest.CaptureFixture) -> None:
    path = write_yaml(BASE.format(epochs=1))
    assert load_experiment(path).tune is None
    assert cli.main(["tune", str(path)]) == 2
    err = capsys.readouterr().err
    assert "no `tune:` section" in err and "\\n" not in err
    # the example it gives is a section that works as written (for a one-cell matrix: with more
    # cells, `tune.cell` has to pick one, and its own error says so)
    example = yaml.safe_load(err.split("e.g. `", 1)[1].split("`", 1)[0])
    path.write_text(path.read_text().replace("model: [ae, vae]", "model: [vae]") + yaml.safe_dump(example))
    assert load_experiment(path).tune.metric == "test/elbo"


def test_good_tune_section_is_typed(write_yaml) -> None:
    path = experiment_file(write_yaml, GOOD_TUNE + "  latent_dim: {low: 2, high: 8}\n  beta: {low: 1, high: 4}\n"
                           "  arch_options.mlp.hidden: {choices: [[32], [64, 64]]}\n"
                           "  kl_anneal.epochs: {low: 0, high: 3}")
    t = load_experiment(path).tune
    kinds = {k: p.type for k, p in t.space.items()}
    # whole-number settings sample ints; float settings sample floats even with integer bounds
    assert kinds == {"lr": "float", "latent_dim": "int", "beta": "float",
                     "arch_options.mlp.hidden": "categorical", "kl_anneal.epochs": "int"}
    assert t.objectives == ["test/elbo"] and t.pruner_name == "median" and t.sampler == "tpe"
    # a family's options apply when the space can draw that family
    path = experiment_file(write_yaml, GOOD_TUNE.replace("cell: {model: vae}", "cell: {}")
                           + "  model: {choices: [vae, beta_tcvae]}\n"
                           "  family_options.beta_tcvae.beta: {low: 1, high: 8}", name="families.yaml")
    assert load_experiment(path).tune.space["family_options.beta_tcvae.beta"].type == "float"


def test_a_trial_that_cannot_start_says_why_in_one_line(write_yaml) -> None:
    # an invalid combination of two dimensions: one line, not pydantic's multi-line dump
    path = experiment_file(write_yaml, """
        metric: test/recon_bce
        direction: minimize
        sampler: grid
        space:
          model: {choices: [vae, ae]}
          prior.kind: {choices: [vamp]}
        """, epochs=1)
    lines: list[str] = []
    assert tune_experiment(load_experiment(path), echo=quiet(lines)) == 0
    failed = [line for line in lines if " FAIL " in line]
    assert len(failed) == 1 and "model=ae" in failed[0], lines
    assert "invalid settings: " in failed[0] and "\n" not in failed[0] and "errors.pydantic.dev" not in failed[0]
    assert "not available for model 'ae'" in failed[0] and "exclude" not in failed[0]  # a space has no rules

    # the same study, its space edited: Optuna refuses to draw the dimension another way; the line says so
    text = path.read_text().replace("prior.kind: {choices: [vamp]}", "prior.kind: {choices: [standard]}")
    path.write_text(text)
    lines.clear()
    assert tune_experiment(load_experiment(path), n_trials=3, echo=quiet(lines)) == 1
    failed = [line for line in lines if " FAIL " in line]
    assert failed and "cannot draw the point: " in failed[0] and "new tune.study_name" in failed[0], lines


def test_an_enqueued_trial_counts_as_this_runs(write_yaml) -> None:
    # enqueued points are in the study (WAITING) before the invocation runs them: they are its trials,
    # for the summary and for the exit code (a failed one used to leave "this run: 0" and exit 0)
    path = experiment_file(write_yaml, GOOD_TUNE + "n_trials: 1\nenqueue: [{lr: 1.0e-3}]", epochs=1)
    lines: list[str] = []
    assert tune_experiment(load_experiment(path), echo=quiet(lines)) == 0
    assert any("this run: 1 (1 complete, 0 pruned, 0 fail)" in line for line in lines), lines
    assert study_of(path).trials[0].params == {"lr": 1.0e-3}


@pytest.mark.slow
def test_a_crashed_worker_leaves_no_trial_running(write_yaml, tmp_path: Path) -> None:
    path = experiment_file(write_yaml, LR_SPACE + "n_trials: 2\n", epochs=150)
    proc = subprocess.Popen([sys.executable, "-m", "vaebench", "tune", str(path), "--jobs", "2"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db = tmp_path / "optuna.db"
    deadline = time.time() + 120
    while time.time() < deadline and trial_states(db) != ["RUNNING"] * 2:
        time.sleep(0.1)
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        (worker,) = conn.execute("SELECT value_json FROM trial_user_attributes WHERE key = 'worker' "
                                 "ORDER BY trial_id LIMIT 1").fetchone()
    os.kill(int(json.loads(worker).rpartition(":")[2]), signal.SIGKILL)  # trial 0's worker
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "FAILED: worker exit codes" in out and "-9" in out, (out, err)
    # marked at the end of this invocation, not at the start of the next one
    assert trial_states(db) == ["FAIL", "COMPLETE"]
    trials = runs_of(path)
    trials = trials[trials["tags.vaebench.kind"] == "trial"].sort_values("tags.vaebench.trial_number")
    assert list(trials["status"]) == ["FAILED", "FINISHED"]


def test_a_study_of_the_same_name_in_another_storage_keeps_its_own_best(write_yaml, tmp_path: Path) -> None:
    path = experiment_file(write_yaml, LR_SPACE + "n_trials: 1\n", epochs=1)
    assert cli.main(["tune", str(path)]) == 0
    assert cli.main(["tune", str(path), "--storage", f"sqlite:///{tmp_path / 'other.db'}"]) == 0
    trials = runs_of(path)
    trials = trials[trials["tags.vaebench.kind"] == "trial"]
    assert len(trials) == 2 and list(trials["tags.vaebench.best"]) == ["true", "true"]


def test_a_one_epoch_trial_is_never_pruned(write_yaml) -> None:
    # pruning after the last epoch saves nothing and throws away a fully trained trial's evaluation
    path = experiment_file(write_yaml, PRUNING, epochs=1)
    assert tune_experiment(load_experiment(path), echo=quiet()) == 0
    study = study_of(path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert study.trials[2].intermediate_values[0] < min(t.intermediate_values[0] for t in study.trials[:2])


def test_a_stop_asked_for_ends_the_trial_at_a_batch_and_keeps_a_trial_being_evaluated(write_yaml,
                                                                                      tmp_path: Path) -> None:
    """What a signal does to `vaebench tune` in one process (cli.graceful_interrupt sets the flag):
    the stop is taken at the next batch, or after the trial being evaluated, never inside a write
    to a store. Asked for during training: that trial FAILs and its run ends KILLED; asked for
    once a trial is complete: no other trial starts."""
    path = experiment_file(write_yaml, LR_SPACE + "n_trials: 3\n", epochs=2)
    polls = []

    def during_training() -> bool:
        polls.append(1)
        return len(polls) > 3  # the objective's first poll, then two batches

    with pytest.raises(KeyboardInterrupt):
        tune_experiment(load_experiment(path), echo=quiet(), should_stop=during_training)
    assert trial_states(tmp_path / "optuna.db") == ["FAIL"]
    trials = runs_of(path)
    trials = trials[trials["tags.vaebench.kind"] == "trial"]
    assert list(trials["status"]) == ["KILLED"] and list(trials["tags.vaebench.error"]) == ["interrupted"]

    def after_a_complete_trial() -> bool:  # as if the signal came while trial 1 was evaluated
        return "COMPLETE" in trial_states(tmp_path / "optuna.db")

    with pytest.raises(KeyboardInterrupt):
        tune_experiment(load_experiment(path), echo=quiet(), should_stop=after_a_complete_trial)
    assert trial_states(tmp_path / "optuna.db") == ["FAIL", "COMPLETE"]  # and no third trial begun
    # the study goes on where it stopped
    assert tune_experiment(load_experiment(path), echo=quiet()) == 0
    assert trial_states(tmp_path / "optuna.db") == ["FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]


def test_a_heartbeat_thread_that_an_interrupt_left_beating_is_stopped(tmp_path: Path) -> None:
    import optuna
    from optuna.storages._heartbeat import HeartbeatThread

    from vaebench.tune.workers import stop_stray_heartbeats

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db", heartbeat_interval=60)
    trial = optuna.create_study(storage=storage).ask()
    beat = HeartbeatThread(trial._trial_id, storage)
    beat.start()  # what a Ctrl-C between its start and Optuna's `with` leaves: started, never stopped
    assert stop_stray_heartbeats() == 1
    beat._thread.join(timeout=10)
    assert not beat._thread.is_alive()  # the interpreter can exit
