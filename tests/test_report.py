"""The HTML/CSV report of a small real study trained in this module: expected rows and figures,
well-formed HTML whose every embedded image decodes, escaping of hostile names, the CSV round trip,
Optuna study sections, graceful degradation, and build time."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import textwrap
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pandas as pd
import pytest
from PIL import Image

from vaebench import tracking
from vaebench.cli import main
from vaebench.config import ConfigError, load_experiment
from vaebench.matrix import expand
from vaebench.report import build_report, default_output
from vaebench.report.collect import collect
from vaebench.report.plots import FIGURES, pareto_mask
from vaebench.runner import run_experiment

HOSTILE = "<script>alert('path')</script>"
STUDY = f"""
name: 'report <script>alert("name")</script> & co'
seeds: [0, 1]
defaults:
  dataset: digits
  epochs: 2
  batch_size: 64
  max_train_samples: 256
  arch_options:
    mlp: {{hidden: [32]}}
evaluate: {{iw_samples: 4}}
matrix:
  model: [ae, vae]
  latent_dim: [2, 4]
  reduction: [sum, mean]
exclude:
  - {{model: ae, reduction: mean}}
include:
  - {{dataset: image_folder, dataset_options: {{image_folder: {{path: "/nonexistent/{HOSTILE}"}}}}, seed: 0}}
"""
N_FINISHED = 12  # ae: 2 latent sizes x 2 seeds; vae: 2 x 2 reductions x 2 seeds
VOID = {"meta", "img", "br", "hr", "input", "link", "source", "col", "area", "base", "wbr"}


def quiet(_: str) -> None:
    pass


# --- the study ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("report-study")
    path = folder / "experiments.yaml"
    path.write_text(textwrap.dedent(STUDY).lstrip())
    exp = load_experiment(path)
    first = run_experiment(exp, progress=False, echo=quiet)
    assert len(first.of("trained")) == N_FINISHED and len(first.of("failed")) == 1
    # a re-run with --force of one cell: the report must show the newer run of that key
    forced = run_experiment(exp, only={"model": ["vae"], "latent_dim": [2], "reduction": ["sum"], "seed": [0]},
                            force=True, progress=False, echo=quiet)
    assert len(forced.of("trained")) == 1
    # a failed attempt after a finished one (same key): still the finished run, failure counted
    tracker = tracking.connect(exp.resolved_tracking_uri(), exp.name)
    ae = next(r for r in first.results if r.spec.settings.model == "ae")
    late = tracking.start_run(tracker, ae.spec.name, {tracking.TAG_KIND: "cell", tracking.TAG_RUN_KEY: ae.spec.key,
                                                      **{k: str(v) for k, v in ae.spec.axes.items()}})
    tracking.set_tags(tracker, late, {tracking.TAG_ERROR: "RuntimeError: boom"})
    tracking.finish(tracker, late, "FAILED")
    # a run of a cell the file no longer has (edited since): left out, counted
    stale = tracking.start_run(tracker, "vae-old-cell", {tracking.TAG_KIND: "cell", tracking.TAG_RUN_KEY: "0123456789ab"})
    tracking.finish(tracker, stale)
    # Optuna studies as `vaebench tune` logs them
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = "sqlite:///" + str(folder / "optuna.db")
    fake_tune_study(tracker, storage, "single <b>study</b>", n=10, multi=False)
    fake_tune_study(tracker, storage, "pareto", n=8, multi=True)
    fake_tune_study(tracker, "sqlite:///" + str(folder / "gone" / "optuna.db"), "lost", n=4, multi=False,
                    log_to_optuna=False)
    t0 = time.perf_counter()
    report = build_report(exp)
    seconds = time.perf_counter() - t0
    print(f"\nreport of {N_FINISHED + 1} runs + 22 trials built in {seconds:.1f} s")
    return {"exp": exp, "path": path, "report": report, "seconds": seconds, "forced": forced.results[0].run_id,
            "first": first, "late_failure": late, "html": report.read_text(encoding="utf-8")}


def fake_tune_study(tracker: tracking.Tracker, storage: str, name: str, *, n: int, multi: bool,
                    log_to_optuna: bool = True) -> None:
    """An Optuna study logged the way `vaebench tune` logs it (a `study` run, one `trial` child run
    per trial with its state), over a cheap synthetic objective so that it takes no training."""
    metrics, directions = (["test/elbo", "train/seconds"], ["maximize", "minimize"]) if multi else \
        (["test/elbo"], ["maximize"])
    parent = tracking.start_run(tracker, name, {
        tracking.TAG_KIND: "study", "optuna.study_name": name, "optuna.storage": storage,
        "vaebench.metrics": ",".join(metrics), "vaebench.directions": ",".join(directions)})
    if log_to_optuna:
        study = optuna.create_study(study_name=name, storage=storage, directions=directions,
                                    sampler=optuna.samplers.RandomSampler(seed=0),
                                    pruner=optuna.pruners.ThresholdPruner(lower=-75.0))
    else:  # the storage is gone (or never reachable from here): only MLflow knows the trials
        study = optuna.create_study(directions=directions, sampler=optuna.samplers.RandomSampler(seed=0),
                                    pruner=optuna.pruners.ThresholdPruner(lower=-75.0))

    def objective(trial: optuna.Trial) -> Any:
        lr = trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        beta = trial.suggest_float("beta", 0.25, 8.0, log=True)
        z = trial.suggest_categorical("latent_dim", [2, 8])
        run = tracking.start_run(tracker, f"t{trial.number}", {
            tracking.TAG_KIND: "trial", "vaebench.trial_number": trial.number, "optuna.study_name": name}, parent)
        tracking.log_params(tracker, run, {"lr": lr, "beta": beta, "latent_dim": z})
        elbo = -40 - 5 * abs(math.log10(lr) + 2.5) - 2 * abs(math.log(beta)) - (3 if z == 2 else 0)
        for step in range(3):
            value = elbo - 30 / (step + 1)
            tracking.log_metrics(tracker, run, {"val/neg_elbo": -value}, step=step)
            if not multi:
                trial.report(value, step)
                if trial.should_prune() and trial.number % 2:
                    tracking.set_tags(tracker, run, {"vaebench.trial_state": "PRUNED"})
                    tracking.finish(tracker, run, "KILLED")
                    raise optuna.TrialPruned()
        seconds = 1 + lr * 100
        tracking.log_metrics(tracker, run, {"test/elbo": elbo, "train/seconds": seconds})
        tracking.set_tags(tracker, run, {"vaebench.trial_state": "COMPLETE"})
        tracking.finish(tracker, run)
        return (elbo, seconds) if multi else elbo

    study.optimize(objective, n_trials=n)
    tracking.finish(tracker, parent)


# --- reading the page ---------------------------------------------------------------------------


class Page(HTMLParser):
    """Parses the report, checking that every element is closed in order, and collects its tables,
    images, figures, links and scripts."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[dict[str, str]] = []
        self.figures: dict[str, dict[str, Any]] = {}
        self.links: list[str] = []
        self.scripts = 0
        self.text: list[str] = []
        self._tables: list[str] = []
        self._cell: list[str] | None = None
        self._figure: str | None = None
        self.feed(text)
        self.close()
        if self.stack:
            self.problems.append(f"unclosed elements at the end: {self.stack}")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "table":
            self._tables.append(a.get("id") or f"table{len(self.tables)}")
            self.tables[self._tables[-1]] = []
        elif tag == "tr" and self._tables:
            self.tables[self._tables[-1]].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(a)
            if self._figure:
                self.figures[self._figure]["img"] = True
        elif tag == "figure":
            self._figure = a.get("id", "")
            self.figures[self._figure] = {"img": False, "text": ""}
        elif tag == "script":
            self.scripts += 1
        for key in ("href", "src"):
            if key in a:
                self.links.append(a[key])

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}> at {self.getpos()}")
            if tag in self.stack:
                while self.stack.pop() != tag:
                    pass
            return
        self.stack.pop()
        if tag in ("td", "th") and self._cell is not None and self._tables:
            self.tables[self._tables[-1]][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._tables.pop()
        elif tag == "figure":
            self._figure = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._figure:
            self.figures[self._figure]["text"] += data
        if self.stack and self.stack[-1] not in ("script", "style"):
            self.text.append(data)

    def table(self, id: str) -> pd.DataFrame:
        rows = self.tables[id]
        return pd.DataFrame(rows[1:], columns=rows[0])


@pytest.fixture(scope="module")
def page(study: dict[str, Any]) -> Page:
    return Page(study["html"])


def header_name(label: str) -> str:
    return label.removesuffix(" ↑").removesuffix(" ↓")


# --- tests --------------------------------------------------------------------------------------


def test_report_lists_one_row_per_run_key_and_the_failed_cell(study: dict[str, Any], page: Page) -> None:
    assert study["report"] == default_output(study["exp"]).resolve()
    assert study["report"].parent == study["path"].parent / "reports"
    specs = [s for s in expand(study["exp"]) if s.settings.dataset == "digits"]
    results = page.table("results-table")
    assert sorted(results["run"]) == sorted(s.name for s in specs) and len(results) == N_FINISHED
    # axis values as columns, then the metrics; deterministic models show a dash for the ELBO
    columns = [header_name(c) for c in results.columns]
    assert columns[:9] == ["run", "dataset", "model", "arch", "latent_dim", "beta", "reduction", "seed", "eff. beta"]
    assert {"ELBO", "bits/dim", "NLL (k=4)", "MSE", "BCE", "KL", "active units", "k-means acc", "NMI", "ARI",
            "silhouette", "kNN acc", "probe acc", "train time"} <= set(columns)
    results.columns = columns
    ae = results[results["model"] == "ae"]
    vae = results[results["model"] == "vae"]
    assert set(ae["ELBO"]) == {"–"} and "–" not in set(vae["ELBO"])
    assert set(vae["eff. beta"]) == {"1", "64"}  # mean reduction on 8x8 digits: beta x 64
    # the forced re-run replaced the first run of its key
    runs = collect(study["exp"], images=False).runs
    assert study["forced"] in set(runs["run_id"])
    assert study["late_failure"] not in set(runs["run_id"])
    # failed cell: listed with its error (escaped), not in the results
    failed = page.table("failed-table")
    assert len(failed) == 1 and "is not a directory" in failed["error"].iloc[0]
    assert HOSTILE in failed["error"].iloc[0]  # shown as text
    # header counts: finished / failed / pruned; the superseded failure is mentioned
    text = " ".join(" ".join(page.text).split())
    assert "1 failed attempt superseded by a finished re-run" in text
    assert "12 matrix runs and 22 Optuna trials" in text
    assert "1 run of cells no longer in the file not shown" in text and "vae-old-cell" not in text


def test_best_value_per_dataset_is_highlighted(study: dict[str, Any]) -> None:
    html = study["html"]
    runs = collect(study["exp"], images=False).runs
    best_elbo = float(runs["test/elbo"].max())
    assert f'<td class="num best" data-v="{best_elbo!r}">{best_elbo:.2f}</td>' in html
    best_mse = float(runs["test/recon_mse"].min())
    assert f'<td class="num best" data-v="{best_mse!r}">' in html


def test_figures_are_drawn_with_a_how_to_read_note(page: Page) -> None:
    for id in FIGURES:
        figure = page.figures[f"fig-{id}"]
        assert figure["img"], f"{id}: {figure['text'][:300]}"
        assert "How to read this." in figure["text"]
    studies = [k for k in page.figures if k.startswith("fig-study")]
    # single: history + importances; pareto: history + importances + Pareto front; lost: history
    assert {"fig-study0-history", "fig-study0-importances", "fig-study1-history", "fig-study1-importances",
            "fig-study1-pareto", "fig-study2-history"} <= set(studies)
    assert all(page.figures[k]["img"] for k in studies)
    assert "could not be drawn" not in " ".join(page.text)


def test_html_is_well_formed_self_contained_and_every_image_decodes(study: dict[str, Any], page: Page) -> None:
    assert not page.problems, page.problems[:5]
    assert page.scripts == 1  # ours, nothing injected
    html = study["html"]
    assert "np.float64" not in html
    assert "<link" not in html and "@import" not in html and "url(" not in html
    sources = [img["src"] for img in page.images]
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    # figures (5 + 7 for the studies) and the gallery: 3 images per VAE, 2 per AE (no samples)
    assert len(sources) == len(FIGURES) + 6 + 8 * 3 + 4 * 2
    for img in page.images:
        assert img.get("alt"), "every image has an alt text"
        picture = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1], validate=True)))
        picture.load()
        assert picture.size[0] > 50 and picture.size[1] > 50
    # links: the CSV download (data:), in-page anchors, and the local MLflow UI hint
    for link in page.links:
        assert link.startswith(("data:", "#", "http://127.0.0.1:5000/#/experiments/")), link


def test_strings_from_the_file_and_mlflow_are_escaped(study: dict[str, Any], page: Page) -> None:
    html = study["html"]
    assert "<script>alert" not in html and "<b>study</b>" not in html
    assert "&lt;script&gt;alert(&quot;name&quot;)&lt;/script&gt; &amp; co" in html  # the study name
    assert "&lt;script&gt;alert(&#x27;path&#x27;)&lt;/script&gt;" in html  # run name, tags, error
    assert "single &lt;b&gt;study&lt;/b&gt;" in html  # an Optuna study name
    title = html[html.index("<title>"):html.index("</title>")]
    assert "&lt;script&gt;" in title
    # the default file name is filename-safe
    assert default_output(study["exp"]).name == "report_script_alert_name_script_co.html"


def test_csv_round_trips_through_pandas(study: dict[str, Any], tmp_path: Path) -> None:
    out = build_report(study["exp"], out=tmp_path / "table.csv", fmt="csv")
    table = pd.read_csv(out)
    assert len(table) == N_FINISHED + 1
    assert list(table["status"].value_counts().items()) == [("FINISHED", N_FINISHED), ("FAILED", 1)]
    runs = collect(study["exp"], images=False).runs.set_index("run_id")
    finished = table[table["status"] == "FINISHED"].set_index("run_id")
    for metric in ("test/elbo", "test/recon_mse", "test/kmeans_acc", "baseline/kmeans_acc", "effective_beta"):
        pd.testing.assert_series_equal(finished[metric].sort_index(), runs[metric].sort_index(),
                                       check_names=False, rtol=1e-12)
    assert finished["latent_dim"].dtype.kind == "i" and set(finished["latent_dim"]) == {2, 4}
    failed = table[table["status"] == "FAILED"].iloc[0]
    assert HOSTILE in failed["run_name"] and "is not a directory" in failed["error"]
    # the HTML embeds the same table as a CSV download
    html = study["html"]
    start = html.index("data:text/csv;charset=utf-8;base64,") + len("data:text/csv;charset=utf-8;base64,")
    embedded = base64.b64decode(html[start:html.index('"', start)]).decode()
    assert embedded == out.read_text(encoding="utf-8")


def test_study_sections(study: dict[str, Any], page: Page) -> None:
    text = " ".join(" ".join(page.text).split())
    assert "study single <b>study</b>" in text
    assert "objective: test/elbo (maximize);" in text
    assert "objective: test/elbo (maximize), train/seconds (minimize);" in text
    assert "pruned" in text and "best trial: #" in text
    # unreachable storage: history from the trial runs in MLflow, importances explained
    assert "the Optuna storage could not be opened" in text
    data = collect(study["exp"], images=False)
    lost = next(s for s in data.studies if s.name == "lost")
    complete = lost.trials[lost.trials["state"] == "COMPLETE"]
    assert len(lost.trials) == 4 and len(complete) >= 2 and not lost.importances
    assert complete["value 0"].notna().all() and set(lost.params) == {"lr", "beta", "latent_dim"}
    single = next(s for s in data.studies if s.name.startswith("single"))
    assert set(single.trials["state"]) <= {"COMPLETE", "PRUNED"} and set(single.params) == {"lr", "beta", "latent_dim"}
    assert abs(sum(single.importances["test/elbo"].values()) - 1) < 1e-6
    pareto = next(s for s in data.studies if s.name == "pareto")
    assert set(pareto.importances) == {"test/elbo", "train/seconds"}


def test_report_from_the_cli(study: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sub" / "mine.html"
    assert main(["report", str(study["path"]), "--out", str(out)]) == 0
    assert f"report written to {out}" in capsys.readouterr().out
    assert Page(out.read_text(encoding="utf-8")).tables["results-table"]
    assert main(["report", str(study["path"]), "--format", "csv", "--out", str(tmp_path / "t.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "t.csv")) == N_FINISHED + 1
    # a directory: the report goes inside under its default name (it used to try a temporary
    # file next to the directory and fail with IsADirectoryError)
    folder = tmp_path / "reports-here"
    folder.mkdir()
    capsys.readouterr()
    assert main(["report", str(study["path"]), "--format", "csv", "--out", str(folder)]) == 0
    written = folder / default_output(study["exp"], "csv").name
    assert f"report written to {written}" in capsys.readouterr().out
    assert [p.name for p in folder.iterdir()] == [written.name] and len(pd.read_csv(written)) == N_FINISHED + 1
    # a folder to be (a trailing slash), and a link to a file: the file behind the link is replaced
    assert main(["report", str(study["path"]), "--format", "csv", "--out", f"{tmp_path / 'new'}/"]) == 0
    assert (tmp_path / "new" / written.name).is_file()
    (tmp_path / "link.csv").symlink_to(tmp_path / "t.csv")
    assert main(["report", str(study["path"]), "--format", "csv", "--out", str(tmp_path / "link.csv")]) == 0
    assert (tmp_path / "link.csv").is_symlink() and len(pd.read_csv(tmp_path / "t.csv")) == N_FINISHED + 1
    # what is not a file is never replaced (a root user's `--out /dev/null` replaced the device)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    capsys.readouterr()
    assert main(["report", str(study["path"]), "--out", str(fifo)]) == 2
    assert f"error: --out {fifo}: {fifo} exists and is not a regular file or a folder" in capsys.readouterr().err
    assert fifo.is_fifo()
    # nor the files the study lives in (its runs were lost to `--out mlruns.db`), a link to one included
    store = Path(study["exp"].resolved_tracking_uri().removeprefix("sqlite:///"))
    (tmp_path / "store-link").symlink_to(store)
    for out, what in ((study["path"], "the experiments file"), (store, "the study's MLflow store"),
                      (tmp_path / "store-link", "the study's MLflow store")):
        before = Path(out).read_bytes()
        assert main(["report", str(study["path"]), "--out", str(out)]) == 2
        assert f"is {what}, which this would overwrite" in capsys.readouterr().err
        assert Path(out).read_bytes() == before


def test_mlflow_ui_view_is_shared(study: dict[str, Any]) -> None:
    client = mlflow.MlflowClient(study["exp"].resolved_tracking_uri())
    tags = client.get_experiment_by_name(study["exp"].name).tags
    view = json.loads(tags["mlflow.sharedViewState.vaebench"])
    assert view["selectedColumns"] == [  # the axes the runs are tagged with (the include sets dataset)
        "tags.`dataset`", "tags.`model`", "tags.`latent_dim`", "tags.`reduction`", "tags.`dataset_options`", "tags.`seed`",
        "metrics.`test/elbo`", "metrics.`test/nll_iw`", "metrics.`test/recon_mse`", "metrics.`test/kmeans_acc`"]
    assert view["searchFilter"] == "tags.`vaebench.kind` = 'cell'"


# --- graceful degradation -----------------------------------------------------------------------


def test_a_study_without_runs_still_renders(write_yaml) -> None:
    path = write_yaml("name: nothing-yet\nmatrix:\n  model: [ae, vae]\n")
    out = build_report(load_experiment(path))
    page = Page(out.read_text(encoding="utf-8"))
    assert not page.problems
    assert "No finished runs yet" in " ".join(page.text)
    assert "2 cells of the file not run yet" in " ".join(" ".join(page.text).split())
    csv = build_report(load_experiment(path), fmt="csv")
    assert pd.read_csv(csv).empty
    assert not (path.parent / "mlruns.db").exists()  # reading created no store


def test_interrupted_and_running_cells_are_not_counted_as_failed(write_yaml) -> None:
    # a report built during a sweep, or after a kill: those cells resume, they have not failed
    exp = load_experiment(write_yaml("name: midway\ndefaults: {dataset: digits}\nmatrix:\n  model: [ae, vae, dae]\n"))
    tracker = tracking.connect(exp.resolved_tracking_uri(), exp.name)
    for spec, status in zip(expand(exp), ["FAILED", "KILLED", "RUNNING"]):
        run = tracking.start_run(tracker, spec.name, {tracking.TAG_KIND: "cell", tracking.TAG_RUN_KEY: spec.key})
        if status != "RUNNING":
            tracking.finish(tracker, run, status)
    page = Page(build_report(exp).read_text(encoding="utf-8"))
    text = " ".join(" ".join(page.text).split())
    assert "0 finished · 1 failed · 0 pruned · 1 interrupted · 1 running runs" in text
    assert sorted(page.table("failed-table")["status"]) == ["FAILED", "KILLED", "RUNNING"]


def test_one_run_without_figures_or_clustering(write_yaml) -> None:
    path = write_yaml("""
        name: single
        defaults: {dataset: digits, epochs: 1, max_train_samples: 128, arch_options: {mlp: {hidden: [16]}}}
        evaluate: {iw_samples: 2, clustering: false, figures: false}
        matrix: {model: [vae]}
    """)
    exp = load_experiment(path)
    run_experiment(exp, progress=False, echo=quiet)
    page = Page(build_report(exp).read_text(encoding="utf-8"))
    assert not page.problems and len(page.table("results-table")) == 1
    text = " ".join(page.text)
    assert "Not drawn: the study has one latent size." in text
    assert "Not drawn: no clustering scores" in text
    assert "Not drawn: every VAE run has the same effective beta (1)." in text
    assert page.figures["fig-rate-distortion"]["img"] and page.figures["fig-learning-curves"]["img"]
    assert "Gallery" not in text  # no artifacts, no gallery
    assert "seeds-table" not in page.tables and "failed-table" not in page.tables
    results = page.table("results-table")
    assert "k-means acc" not in [header_name(c) for c in results.columns]  # never measured: no column


# --- pieces -------------------------------------------------------------------------------------


def test_pareto_mask() -> None:
    values = [[1.0, 5.0], [2.0, 6.0], [2.0, 4.0], [0.5, 1.0]]  # maximise the first, minimise the second
    assert pareto_mask(values, ["maximize", "minimize"]) == [False, False, True, True]
    assert pareto_mask(values, ["minimize", "minimize"]) == [False, False, False, True]


def test_a_real_tune_study_is_reported(write_yaml) -> None:
    path = write_yaml("""
        name: tuned
        defaults: {dataset: digits, epochs: 1, max_train_samples: 128, latent_dim: 2,
                   arch_options: {mlp: {hidden: [16]}}}
        evaluate: {iw_samples: 2, clustering: false, figures: false}
        matrix: {model: [vae]}
        tune:
          metric: test/elbo
          direction: maximize
          sampler: random
          seed: 0
          n_trials: 3
          space:
            lr: {low: 1.0e-3, high: 1.0e-2, log: true}
    """)
    from vaebench.tune import tune_experiment

    exp = load_experiment(path)
    assert tune_experiment(exp, echo=quiet) == 0
    data = collect(exp, images=False)
    assert len(data.studies) == 1 and data.runs.empty
    (tuned,) = data.studies
    assert tuned.objectives == ["test/elbo"] and tuned.directions == ["maximize"]
    assert list(tuned.trials["state"]) == ["COMPLETE"] * 3 and tuned.params == ["lr"]
    assert tuned.trials["value 0"].notna().all() and set(tuned.importances) == {"test/elbo"}
    page = Page(build_report(exp).read_text(encoding="utf-8"))
    assert not page.problems and page.figures["fig-study0-history"]["img"]
    text = " ".join(" ".join(page.text).split())
    assert "3 finished" in text
    # the header counts the trials' training and machine; the matrix's figures wait for its runs
    seconds = float(re.search(r"total training time ([\d.e-]+) s", text).group(1))
    logged = sum(r.data.metrics["train/seconds"] for r in tracking.search(
        tracking.connect(exp.resolved_tracking_uri(), exp.name)) if "train/seconds" in r.data.metrics)
    assert seconds > 0 and seconds == pytest.approx(logged, rel=0.05, abs=0.05)
    assert "not recorded" not in text and "device cpu (3 runs)" in text
    assert "Not drawn: no finished runs of the matrix yet." in text and "no VAE runs" not in text


def test_published_numbers_are_shown_beside_ours_and_flagged_beyond_tolerance(write_yaml) -> None:
    path = write_yaml("""
        name: refs
        seeds: [0, 1]
        defaults: {dataset: digits, epochs: 1, max_train_samples: 128, arch_options: {mlp: {hidden: [16]}}}
        evaluate: {iw_samples: 2, clustering: false, figures: false}
        matrix: {model: [ae, vae]}
        reference:
          - {metric: test/nll_iw, value: 40.0, source: "a paper, Table 1", where: {model: vae}, tolerance: 1000}
          - {metric: test/recon_mse, value: 0.0, source: "an impossible claim", where: {model: ae, seed: 0},
             tolerance: 0.0001}
          - {metric: test/elbo, value: -1.0, source: "not for an ae", where: {model: ae, seed: 1}, tolerance: 1}
          - {metric: test/recon_bce, value: 30.0, source: "no tolerance given"}
    """)
    exp = load_experiment(path)
    run_experiment(exp, progress=False, echo=quiet)
    refs = collect(exp, images=False).references
    vae = refs[refs["reference"] == 0]
    assert list(vae["run_name"].str.startswith("vae")) == [True, True, False]  # two seeds, then their mean
    assert vae.iloc[2]["run_name"] == "mean of 2 runs" and set(vae["status"]) == {"within"}
    assert vae.iloc[2]["ours"] == pytest.approx(vae.iloc[:2]["ours"].mean())
    assert vae.iloc[0]["difference"] == pytest.approx(vae.iloc[0]["ours"] - 40.0)
    (impossible,) = refs[refs["reference"] == 1].itertuples()
    assert impossible.status == "beyond" and impossible.difference > 0.0001
    assert refs[refs["reference"] == 2]["status"].tolist() == ["not measured"]
    assert set(refs[refs["reference"] == 3]["status"]) == {"no tolerance"} and len(refs[refs["reference"] == 3]) == 5
    page = Page(build_report(exp).read_text(encoding="utf-8"))
    assert not page.problems
    table = page.table("references-table")
    assert len(table) == len(refs) and "⚠ beyond" in set(table["status"])
    assert "a paper, Table 1" in set(table["source"])
    assert "1 of 4 compared values are beyond" in " ".join(" ".join(page.text).split())


def test_reference_entries_are_checked(write_yaml) -> None:
    base = "name: r\ndefaults: {dataset: digits}\nmatrix: {model: [ae, vae]}\nreference:\n"
    bad = {
        "  - {metric: val/loss, value: 1, source: s}\n": "reference[0].metric: 'val/loss' is not a final metric",
        "  - {metric: test/elbo_typo, value: 1, source: s}\n":
            "reference[0].metric: 'test/elbo_typo' is not a metric vaebench logs; test/ metrics: elbo, bpd",
        "  - {metric: test/dead_codes, value: 1, source: s}\n":
            "reference[0].metric: test/dead_codes is logged by vq_vae runs only",
        "  - {metric: test/elbo, value: 1, source: s, where: {modle: vae}}\n": "unknown setting 'modle'",
        "  - {metric: test/elbo, value: 1, source: s, where: {model: dae}}\n": "matches no cell of the matrix",
        "  - {metric: test/elbo, value: 1}\n": "reference[0].source: Field required",
        "  - {metric: test/elbo, value: 1, source: s, tol: 2}\n": "unknown key 'tol'; allowed: metric, value, source",
    }
    for entry, message in bad.items():
        with pytest.raises(ConfigError) as info:
            load_experiment(write_yaml(base + entry))
        assert message in str(info.value), (entry, str(info.value))
