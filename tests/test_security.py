"""Security, end to end on real stores (issue 10):

- the experiments file goes through a safe YAML loader: a Python tag is refused with a clear error
  (exit code 2) and nothing it names runs;
- torch artifacts load with weights_only=True: a pickle with a code payload placed as a run's
  checkpoint or model is refused in one line that names it, without running the payload and
  without advice to load it unrestricted (`tracking.load_torch`, read in place or downloaded from
  a tracking server, `vaebench evaluate`, and a resumed `vaebench run`);
- names from the experiments file or from MLflow (an experiment or run name with `../` and `/`)
  never become paths outside the project's folders;
- a report built from runs whose names, params and tags hold URLs connects to nothing and links
  nothing but MLflow's own pages, and opens no Optuna storage a run names.

Elsewhere: `vaebench ui` binds to loopback only (test_cli.py), and the same URL-laden report opened
in a real browser makes no request (test_browser.py).
"""

from __future__ import annotations

import os
import shutil
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from support import Listener, log_runs_with_urls, mlflow_server

from vaebench import tracking
from vaebench.cli import main
from vaebench.config import ConfigError, load_experiment
from vaebench.report import build_report, default_output
from vaebench.report.collect import collect
from vaebench.runner import evaluate_experiment, run_experiment


class Payload:
    """Unpickling this calls os.mkdir(marker): when the marker exists, a load ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return os.mkdir, (self.marker,)


def quiet(_: str) -> None:
    pass


def assert_refused(message: str, run_id: str, artifact: str) -> None:
    assert "\n" not in message, message
    assert f"{artifact} of run {run_id} was refused" in message, message
    assert "mkdir" in message, message  # says what it found
    assert "weights_only" not in message and "trusted source" not in message, message


# --- YAML ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.mkdir [{marker}]", "!!python/object/new:os.mkdir [{marker}]",
                                 "!!python/object:vaebench.config.Experiment {{name: x}}", "!!python/name:os.mkdir"])
@pytest.mark.parametrize("where, line", [("name: {value}\nseeds: [0]", 1),
                                         ("name: x\nmatrix:\n  model:\n    - vae\n    - {value}", 5)])
def test_python_tags_in_the_experiments_file_are_refused(write_yaml, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         tag: str, where: str, line: int) -> None:
    marker = tmp_path / "yaml-ran"
    path = write_yaml(where.format(value=tag.format(marker=f"'{marker}'")) + "\n")
    expected = f"{path}:{line}: invalid YAML: could not determine a constructor for the tag 'tag:yaml.org,2002:python/"
    with pytest.raises(ConfigError) as refused:
        load_experiment(path)
    assert str(refused.value).startswith(expected), str(refused.value)
    for command in ("ls", "run"):
        assert main([command, str(path)]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err
    assert not marker.exists()
    assert not (tmp_path / "mlruns.db").exists()  # nothing was logged


# --- torch artifacts ----------------------------------------------------------------------------


def test_a_code_payload_in_a_torch_artifact_is_refused(tmp_path: Path) -> None:
    tracker = tracking.connect("sqlite:///" + str(tmp_path / "mlruns.db"), "payloads")
    run = tracking.start_run(tracker, "cell", {tracking.TAG_KIND: "cell"})
    tracking.log_torch(tracker, run, "checkpoints/plain.pt", {"epoch": 3, "weight": torch.ones(2)})
    assert tracking.load_torch(tracker, run, "checkpoints/plain.pt")["epoch"] == 3  # what vaebench writes loads
    marker = tmp_path / "payload-ran"
    for artifact in (tracking.CHECKPOINT_PATH, tracking.MODEL_PATH):
        tracking.log_torch(tracker, run, artifact, {"epoch": 3, "state_dict": {"w": torch.ones(2)},
                                                    "history": [Payload(marker)]})
        with pytest.raises(tracking.UnsafeArtifact) as refused:
            tracking.load_torch(tracker, run, artifact)
        assert_refused(str(refused.value), run, artifact)
    assert not marker.exists()
    # the payload is live: an unrestricted load of the same file runs it
    stored = Path(tracker.client.get_run(run).info.artifact_uri.removeprefix("file://")) / tracking.MODEL_PATH
    torch.load(stored, weights_only=False)
    assert marker.is_dir()


@pytest.mark.slow
def test_a_code_payload_downloaded_from_a_tracking_server_is_refused(tmp_path: Path) -> None:
    with mlflow_server(tmp_path, "sqlite:///" + str(tmp_path / "server.db")) as url:
        tracker = tracking.connect(url, "payloads")
        run = tracking.start_run(tracker, "cell", {tracking.TAG_KIND: "cell"})
        assert tracker.client.get_run(run).info.artifact_uri.startswith("mlflow-artifacts:")  # downloaded
        marker = tmp_path / "payload-ran"
        tracking.log_torch(tracker, run, tracking.CHECKPOINT_PATH, {"epoch": 1, "history": Payload(marker)})
        with pytest.raises(tracking.UnsafeArtifact) as refused:
            tracking.load_torch(tracker, run, tracking.CHECKPOINT_PATH)
    assert_refused(str(refused.value), run, tracking.CHECKPOINT_PATH)
    assert not marker.exists()


def test_reevaluation_and_resume_refuse_a_code_payload(tiny_file: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    exp = load_experiment(tiny_file)
    first = run_experiment(exp, progress=False, echo=quiet)
    assert len(first.of("trained")) == 2
    runs = {r.spec.settings.model: r.run_id for r in first.results}
    tracker = tracking.connect(exp.resolved_tracking_uri(), exp.name)
    marker = tmp_path / "payload-ran"
    tracking.log_torch(tracker, runs["vae"], tracking.MODEL_PATH, {"state_dict": Payload(marker),
                                                                   "in_shape": [1, 8, 8]})
    tracking.log_torch(tracker, runs["ae"], tracking.CHECKPOINT_PATH, {"epoch": 1, "history": [Payload(marker)]})

    # `vaebench evaluate`: both cells fail with the refusal, in one line each
    summary = evaluate_experiment(exp, echo=quiet)
    assert [r.status for r in summary.results] == ["failed", "failed"]
    errors = {r.spec.settings.model: r.error for r in summary.results}
    assert_refused(errors["vae"], runs["vae"], tracking.MODEL_PATH)
    assert_refused(errors["ae"], runs["ae"], tracking.CHECKPOINT_PATH)
    assert main(["evaluate", str(tiny_file)]) == 1
    out = capsys.readouterr().out
    assert out.count("was refused, not loaded") == 4  # the per-cell lines and the summary
    assert "weights_only" not in out

    # `vaebench run` on a cell whose unfinished run's checkpoint is the payload: never run
    tracking.finish(tracker, runs["ae"], "FAILED")
    main(["run", str(tiny_file), "--no-progress", "--no-report"])
    captured = capsys.readouterr()
    assert "weights_only" not in captured.out + captured.err
    assert not marker.exists()


# --- names never become paths -------------------------------------------------------------------


NAMES = """
name: '../../escape/../{parent}/x<b>'
seeds: [0]
defaults:
  dataset: digits
  epochs: 1
  batch_size: 64
  max_train_samples: 128
  arch_options:
    mlp: {{hidden: [16]}}
evaluate: {{iw_samples: 2, clustering: false}}
matrix:
  model: [vae]
include:
  - {{dataset: image_folder, dataset_options: {{image_folder: {{path: "../../../{parent}/nonexistent"}}}}}}
"""


def test_names_with_slashes_and_dots_never_become_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    project = tmp_path / "home" / "project"
    project.mkdir(parents=True)
    monkeypatch.chdir(project)
    path = project / "experiments.yaml"
    path.write_text(textwrap.dedent(NAMES.format(parent=tmp_path.name)).lstrip())
    assert main(["run", str(path), "--no-progress"]) == 1  # the image_folder cell fails: no such folder
    out = capsys.readouterr().out
    assert "1 trained (0 resumed), 0 skipped (already finished), 1 failed" in out
    assert main(["report", str(path), "--format", "csv"]) == 0
    data = collect(load_experiment(path), images=False)
    names = [*data.runs["run_name"], *data.failed["run_name"]]
    assert any("../" in n for n in names) and data.name.startswith("../../")

    # everything written is inside the project: the store, its artifacts, the reports
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert all(p.parts[:2] == ("home", "project") for p in written), written
    top = {p.parts[2] for p in written}
    assert top <= {"experiments.yaml", "mlruns.db", "mlartifacts", "reports", "data"}, top
    safe = f"escape_.._{tmp_path.name}_x_b"
    assert sorted(p.name for p in (project / "reports").iterdir()) == [f"{safe}.csv", f"{safe}.html"]
    assert default_output(load_experiment(path)).parent == project / "reports"
    # the artifacts of every run sit under its run id, whatever its name
    artifacts = {p.relative_to(project / "mlartifacts").parts[0] for p in (project / "mlartifacts").rglob("*")
                 if p.is_file()}
    assert artifacts == {*data.runs["run_id"], *data.failed["run_id"]}
    # the report's CSV download is offered under the same filename-safe name
    html = (project / "reports" / default_output(load_experiment(path)).name).read_text(encoding="utf-8")
    assert f'download="{default_output(load_experiment(path), "csv").name}"' in html


# --- nothing fetched from a URL found in a run --------------------------------------------------


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []  # (tag, attribute, value)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [(tag, k, v or "") for k, v in attrs if k in ("href", "src", "action", "srcset", "poster", "data")]


def test_a_report_of_runs_full_of_urls_fetches_nothing(tmp_path: Path) -> None:
    with Listener() as listener:
        exp = log_runs_with_urls(tmp_path, listener.url)
        report = build_report(exp)
        csv = build_report(exp, fmt="csv")
    assert listener.connections == []  # no HTTP request, no database connection

    html = report.read_text(encoding="utf-8")
    links = Links()
    links.feed(html)
    for tag, attribute, value in links.urls:
        if attribute == "src":
            assert tag == "img" and value.startswith("data:image/png;base64,"), value[:100]
        else:
            assert value.startswith(("data:text/csv", "#", "http://127.0.0.1:5000/#/experiments/")), value
    # the URLs are there, as text: escaped markup, never an element
    assert f"{listener.url}/run/" in html and f"&lt;img src=&#x27;{listener.url}/error.png&#x27;&gt;" in html
    assert f"&lt;link rel=stylesheet href=&quot;{listener.url}/host.css&quot;&gt;" in html
    assert "<link" not in html and "url(" not in html.replace(f"url({listener.url}/", "")
    assert f"{listener.url}/run/" in csv.read_text(encoding="utf-8")

    # the Optuna storages the study runs name are not opened: the trials come from MLflow
    studies = {s.name: s for s in collect(exp, images=False).studies}
    assert set(studies) == {"net", "elsewhere"}
    for study in studies.values():
        assert len(study.trials) == 2 and not study.importances  # the storage elsewhere holds 3 trials
        assert any("the report opens no storage a run names" in n for n in study.notes), study.notes
    assert "user:***@" in " ".join(studies["net"].notes) and "secret" not in html
    assert not (tmp_path / "optuna.db").exists()  # nor created the file's own


def test_the_files_own_optuna_storage_is_still_opened(tmp_path: Path) -> None:
    with Listener() as listener:
        exp = log_runs_with_urls(tmp_path, listener.url)
    # the study that lives in the file's own storage (optuna.db next to the store): read in full
    shutil.copy(tmp_path / "elsewhere" / "optuna.db", tmp_path / "optuna.db")
    tracker = tracking.connect(exp.resolved_tracking_uri(), exp.name)
    own = next(r for r in tracking.search(tracker, "tags.`optuna.study_name` = 'elsewhere'")
               if r.data.tags.get(tracking.TAG_KIND) == "study")
    tracking.set_tags(tracker, own.info.run_id, {"optuna.storage": "sqlite:///" + str(tmp_path / "optuna.db")})
    study = next(s for s in collect(exp, images=False).studies if s.name == "elsewhere")
    assert len(study.trials) == 3 and study.importances, study.notes
