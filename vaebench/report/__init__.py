"""The study report: MLflow runs -> pandas (`collect`) -> seaborn figures (`plots`) -> one HTML file
(`html`), or the results table as CSV.

    vaebench report experiments.yaml                       # reports/<name>.html next to the file
    vaebench report experiments.yaml --format csv --out results.csv

`build_report` is all the CLI (and `vaebench run`, when the matrix finishes) needs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from vaebench.outputs import output_path, write_atomic
from vaebench.report.vocabulary import filename_safe

if TYPE_CHECKING:
    import pandas as pd

    from vaebench.config import Experiment
    from vaebench.report.collect import ReportData

__all__ = ["build_report", "default_output", "filename_safe", "results_frame"]

FORMATS = ("html", "csv")
UI_METRICS = ("test/elbo", "test/nll_iw", "test/recon_mse", "test/kmeans_acc")  # columns of the MLflow UI view


def default_output(exp: Experiment, fmt: str = "html") -> Path:
    """reports/<experiment name>.<fmt> next to the experiments file, the name made filename-safe."""
    return exp.base_dir / "reports" / f"{filename_safe(exp.name)}.{fmt}"


def build_report(exp: Experiment, out: str | os.PathLike | None = None, fmt: str = "html") -> Path:
    """Read every run of `exp` from its tracking store and write the report; return its path.

    `out` defaults to `default_output(exp, fmt)`; a relative `out` is taken relative to the
    working directory (as typed on the command line), and a folder gets the file under its default
    name (`vaebench.outputs.output_path`). Works with any number of runs, including none (the report then says so)."""
    from vaebench.report.collect import collect

    if fmt not in FORMATS:
        raise ValueError(f"unknown report format {fmt!r}; allowed: {', '.join(FORMATS)}")
    from vaebench.tune.storage import study_files

    path = (output_path(out, default_output(exp, fmt).name, "--out", keep=study_files(exp)) if out
            else default_output(exp, fmt))
    data = collect(exp, images=fmt == "html")
    table = results_frame(data)
    csv_text = table.to_csv(index=False)
    if fmt == "csv":
        text = csv_text
    else:
        text = render_html(exp, data, csv_text)
    return write_atomic(path, text)  # a reader (or a concurrent build) never sees half a report


def render_html(exp: Experiment, data: ReportData, csv_text: str) -> str:
    from vaebench.report.collect import share_ui_view
    from vaebench.report.html import render, table_columns
    from vaebench.report.plots import draw_all, draw_study

    figures = draw_all(data)
    study_figures = [draw_study(i, s) for i, s in enumerate(data.studies)]
    if data.experiment_id:
        # the axes `vaebench run` tags runs with (the file's matrix and include keys, the seed)
        tagged = {*exp.matrix, *(k for entry in exp.include for k in entry), "seed"}
        metrics = [c.key for c in table_columns(data.runs)]
        share_ui_view(exp, [a for a in data.axes if a in tagged],
                      [m for m in UI_METRICS if m in metrics] or metrics[:3])
    return render(data, figures, study_figures, csv_text, exp_file=_display_path(exp))


def _display_path(exp: Experiment) -> str:
    if exp.path is None:
        return "experiments.yaml"
    try:
        relative = os.path.relpath(exp.path)
    except ValueError:  # another drive (Windows)
        return str(exp.path)
    import shlex

    return shlex.quote(str(exp.path) if relative.startswith("..") else relative)


def results_frame(data: ReportData) -> pd.DataFrame:
    """The results table as a DataFrame (what the CSV holds): one row per run, finished runs first
    then failed ones, with run name and id, status, axis values, effective beta, every test/*
    metric, the raw-pixel baseline scores, training time and epochs, and the error of failed runs."""
    import pandas as pd

    from vaebench.report.vocabulary import METRIC_COLUMNS

    frames = [f for f in (data.runs, data.failed) if len(f)]
    if not frames:
        return pd.DataFrame(columns=["run_name", "run_id", "status", *data.axes])
    both = pd.concat(frames, ignore_index=True)
    first = [c.key for c in METRIC_COLUMNS if c.key.startswith("test/")]
    metrics = [m for m in first if m in both] + sorted(
        c for c in both if c.startswith("test/") and c not in first) + sorted(
        c for c in both if c.startswith("baseline/"))
    tail = [c for c in ("train/seconds", "train/epochs_run", "train/best_epoch") if c in both]
    columns = ["run_name", "run_id", "run_key", "status", *data.axes,
               *(["effective_beta"] if "effective_beta" in both else []), *metrics, *tail, "device", "error"]
    return both.reindex(columns=columns)
