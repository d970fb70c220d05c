"""Render the report as one self-contained HTML file: images embedded as data URIs, a few lines of
inline CSS and JavaScript (sortable tables, regrouping the gallery), nothing fetched from anywhere.

Every string that comes from the experiments file or from MLflow goes through `e()` (HTML
escaping) before it reaches the page; the page's Content-Security-Policy only allows the one
inline script it ships (by hash) and data: images, so even a string that escaped escaping could
not run or load anything.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import platform
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from vaebench.report.collect import ReportData, Study
    from vaebench.report.plots import ReportFigure


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    fmt: str = "{:.3f}"
    better: int = 0  # +1 higher is better, -1 lower is better, 0 no "best" (highlighted per dataset)
    help: str = ""


# The results table's metric columns, in order (columns without any value are left out).
METRIC_COLUMNS = (
    Column("test/elbo", "ELBO", "{:.2f}", +1, "evidence lower bound on log p(x), nats per image (beta = 1, sum reduction)"),
    Column("test/bpd", "bits/dim", "{:.4f}", -1, "-ELBO in bits per pixel"),
    Column("test/nll_iw", "NLL", "{:.2f}", -1, "importance-weighted estimate of -log p(x), nats per image (k samples)"),
    Column("test/recon_mse", "MSE", "{:.4f}", -1, "reconstruction mean squared error per pixel, from the posterior mean"),
    Column("test/recon_bce", "BCE", "{:.2f}", -1, "reconstruction binary cross-entropy per image, nats"),
    Column("test/noisy_recon_mse", "denoise MSE", "{:.4f}", -1, "dae: MSE of the clean image reconstructed from a noisy input"),
    Column("test/kl", "KL", "{:.2f}", 0, "KL(q(z|x) || p(z)) summed over latent dims, nats per image"),
    Column("test/active_units", "active units", "{:.0f}", 0, "latent dims whose posterior mean varies over x (variance > 0.01)"),
    Column("test/kmeans_acc", "k-means acc", "{:.3f}", +1, "k-means on the latent means, accuracy under the best label matching"),
    Column("test/nmi", "NMI", "{:.3f}", +1, "normalised mutual information of k-means clusters and labels"),
    Column("test/ari", "ARI", "{:.3f}", +1, "adjusted Rand index of k-means clusters and labels"),
    Column("test/silhouette", "silhouette", "{:.3f}", +1, "silhouette score of the labels in latent space"),
    Column("test/knn_acc", "kNN acc", "{:.3f}", +1, "k-nearest-neighbour accuracy (train latents -> test latents)"),
    Column("test/probe_acc", "probe acc", "{:.3f}", +1, "logistic-regression probe accuracy (train latents -> test latents)"),
    Column("test/codebook_perplexity", "codebook perplexity", "{:.1f}", 0,
           "vq_vae: exp(entropy) of the code usage on the test split (the codebook size if all are used equally)"),
    Column("test/dead_codes", "dead codes", "{:.0f}", 0, "vq_vae: codebook entries never used on the test split"),
    Column("train/seconds", "train time", "{:.1f}s", 0, "training time, seconds"),
)
EFFECTIVE_BETA = Column("effective_beta", "eff. beta", "{:g}", 0, "KL weight of the equivalent sum-reduction objective")
SEED_TABLE = ("test/elbo", "test/nll_iw", "test/recon_mse", "test/kmeans_acc", "test/nmi", "test/knn_acc")
METRIC_LABELS = {c.key: c.label for c in METRIC_COLUMNS} | {
    "val/neg_elbo": "validation -ELBO", "val/recon": "validation reconstruction",
    "effective_beta": "effective beta"}
GALLERY_CAPTIONS = {"reconstructions.png": "test images (top) and reconstructions",
                    "samples.png": "samples from the prior", "latent_scatter.png": "latent means by label"}


def e(value: Any) -> str:
    """HTML-escape anything (quotes included, so it is safe in attributes too)."""
    return html.escape("" if value is None else str(value), quote=True)


def fmt_value(value: Any, spec: str = "{:.3f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    try:
        return spec.format(value)
    except (TypeError, ValueError):
        return str(value)


def is_missing(value: Any) -> bool:
    try:
        import pandas as pd

        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


# --- the page ------------------------------------------------------------------------------------


def render(data: ReportData, figures: list[ReportFigure], study_figures: list[list[ReportFigure]],
           csv_text: str, exp_file: str | None = None) -> str:
    columns = table_columns(data.runs)
    sections = [
        ("results", "Results", results_section(data, columns, csv_text)),
        ("references", "Published numbers", references_section(data)),
        ("seeds", "Mean and spread over seeds", seeds_section(data)),
        ("failed", "Failed runs", failed_section(data)),
        ("figures", "Comparisons", figures_section(figures)),
        ("studies", "Optuna studies", studies_section(data, study_figures)),
        ("gallery", "Gallery", gallery_section(data)),
    ]
    sections = [s for s in sections if s[2]]
    nav = " · ".join(f'<a href="#{id}">{e(title)}</a>' for id, title, _ in sections)
    body = "\n".join(f'<section id="{id}"><h2>{e(title)}</h2>\n{content}</section>' for id, title, content in sections)
    script = SCRIPT
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'; "
           "base-uri 'none'; form-action 'none'")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{e(csp)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="vaebench">
<title>{e(data.name)} · vaebench report</title>
<style>{STYLE}</style>
</head>
<body>
<header>
{header(data, exp_file)}
<nav>{nav}</nav>
</header>
<main>
{body}
</main>
<footer>Generated by vaebench on {e(time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(data.generated)))}
from {e(data.tracking_uri)}. Rebuild with <code>vaebench report {e(exp_file or 'FILE')}</code>.</footer>
<script>{script}</script>
</body>
</html>
"""


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "–"


def duration(seconds: float) -> str:
    if not seconds or math.isnan(seconds):
        return "0 s"
    minutes, s = divmod(int(round(seconds)), 60)
    h, m = divmod(minutes, 60)
    return f"{h} h {m:02d} min" if h else (f"{m} min {s:02d} s" if m else f"{seconds:.1f} s")


def header(data: ReportData, exp_file: str | None) -> str:
    runs, failed = data.runs, data.failed
    trials = [s.trials for s in data.studies]
    pruned = sum(int((t["state"] == "PRUNED").sum()) for t in trials if "state" in t)
    trial_done = sum(int((t["state"] == "COMPLETE").sum()) for t in trials if "state" in t)
    trial_failed = sum(int((t["state"] == "FAIL").sum()) for t in trials if "state" in t)
    counts = [f"<b>{len(runs) + trial_done}</b> finished", f"<b>{len(failed) + trial_failed}</b> failed",
              f"<b>{pruned}</b> pruned"]
    extra = []
    if data.studies:
        extra.append(f"{len(runs)} matrix runs and {sum(len(t) for t in trials)} Optuna trials")
    if data.not_run:
        extra.append(f"{plural(data.not_run, 'cell')} of the file not run yet")
    if data.outside_file:
        extra.append(f"{plural(data.outside_file, 'run')} of cells no longer in the file not shown")
    if data.superseded_failures:
        extra.append(f"{plural(data.superseded_failures, 'failed attempt')} superseded by a finished re-run")
    seconds = float(runs["train/seconds"].sum()) if "train/seconds" in runs else 0.0
    wall = float((runs["end_time"] - runs["start_time"]).sum()) if len(runs) else 0.0
    axes = "".join(f"<tr><th>{e(axis)}</th><td>{e(', '.join(_plain(v) for v in values))}</td></tr>"
                   for axis, values in data.matrix_axes.items())
    machine = "".join(f"<tr><th>{e(k)}</th><td>{e('; '.join(v))}</td></tr>" for k, v in data.machine.items())
    ui = ""
    link = data.experiment_link()
    if link:
        ui = f'<a href="{e(link)}">open the runs in the MLflow UI</a>'
    elif data.experiment_id:
        local = data.experiment_link("http://127.0.0.1:5000")
        ui = (f"MLflow UI: run <code>vaebench ui {e(exp_file or 'FILE')}</code>, then open "
              f'<a href="{e(local)}">{e(local)}</a> (the runs with their axis values as columns)')
    return f"""<h1>{e(data.name)}</h1>
<p class="lead">{' · '.join(counts)} runs{(' (' + e('; '.join(extra)) + ')') if extra else ''}.
Runs from {e(when(data.started))} to {e(when(data.ended))}; total training time {e(duration(seconds))}
(wall clock of the runs incl. evaluation {e(duration(wall))}).</p>
<div class="facts">
<table class="kv"><caption>matrix</caption>{axes or '<tr><td>no matrix axes</td></tr>'}
<tr><th>seeds</th><td>{e(', '.join(str(s) for s in sorted(runs['seed'].dropna().unique())) if 'seed' in runs and len(runs) else '–')}</td></tr></table>
<table class="kv"><caption>machine</caption>{machine or '<tr><td>not recorded</td></tr>'}
<tr><th>report built on</th><td>{e(platform.node())}</td></tr></table>
</div>
<p class="small">Tracking store: <code>{e(data.tracking_uri)}</code>{' · ' + ui if ui else ''}</p>"""


def _plain(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else (f"{value:g}" if isinstance(value, float) else str(value))


# --- tables -------------------------------------------------------------------------------------


def table_columns(runs: pd.DataFrame) -> list[Column]:
    return [c for c in METRIC_COLUMNS if c.key in runs and runs[c.key].notna().any()]


def shown_axes(data: ReportData, frame: pd.DataFrame) -> list[str]:
    return [a for a in data.axes if a in frame and frame[a].notna().any()]


def results_section(data: ReportData, columns: list[Column], csv_text: str) -> str:
    runs = data.runs
    if runs.empty:
        return ("<p>No finished runs yet. Train the matrix with <code>vaebench run</code>; "
                "the report then shows one row per run.</p>" + ("" if data.failed.empty else
                                                                "<p>See the failed runs below.</p>"))
    axes = shown_axes(data, runs)
    k = sorted(runs["test/nll_iw_k"].dropna().unique()) if "test/nll_iw_k" in runs else []
    best = best_cells(runs, columns)
    head = ["<th>run</th>"] + [f'<th title="axis">{e(a)}</th>' for a in axes]
    if "effective_beta" in runs:
        head.append(f'<th title="{e(EFFECTIVE_BETA.help)}">{e(EFFECTIVE_BETA.label)}</th>')
    for c in columns:
        label = c.label + (f" (k={int(k[0])})" if c.key == "test/nll_iw" and len(k) == 1 else "")
        arrow = {1: " ↑", -1: " ↓"}.get(c.better, "")
        head.append(f'<th class="num" title="{e(c.help)}">{e(label)}{arrow}</th>')
    rows = []
    for i, row in runs.iterrows():
        link = data.run_link(row["run_id"])
        name = (f'<a href="{e(link)}">{e(row["run_name"])}</a>' if link else e(row["run_name"]))
        cells = [f'<td data-v="{e(row["run_name"])}" title="run {e(row["run_id"])}">{name}</td>']
        cells += [_axis_cell(row[a]) for a in axes]
        if "effective_beta" in runs:
            cells.append(_num_cell(row["effective_beta"], EFFECTIVE_BETA.fmt))
        na = set(str(row.get("not_applicable") or "").split(","))
        for c in columns:
            value = row[c.key]
            text = fmt_value(None if is_missing(value) else value, c.fmt)
            if c.key == "test/nll_iw" and len(k) > 1 and not is_missing(row.get("test/nll_iw_k")):
                text += f" (k={int(row['test/nll_iw_k'])})"
            title = "not applicable to deterministic models" if c.key in na else ""
            cells.append(_num_cell(value, c.fmt, text=text, best=(i, c.key) in best, title=title))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    from vaebench.report import filename_safe

    download = (f'<a download="{e(filename_safe(data.name))}.csv" href="data:text/csv;charset=utf-8;base64,'
                f'{base64.b64encode(csv_text.encode()).decode()}">download this table as CSV</a>')
    note = ("<p class=\"small\">One row per run (the latest finished run of each cell). Click a column "
            "to sort; ↑/↓ says which way is better, and the best value per dataset is "
            "<span class=\"best\">highlighted</span>. – : not measured or not applicable (ELBO-type "
            f"metrics of deterministic models). {download}.</p>")
    return note + _table("results-table", head, rows)


def _table(id: str, head: list[str], rows: list[str]) -> str:
    ident = f' id="{e(id)}"' if id else ""
    return (f'<div class="scroll"><table{ident} class="sortable"><thead><tr>{"".join(head)}</tr></thead>'
            f'<tbody>\n' + "\n".join(rows) + "\n</tbody></table></div>")


def _axis_cell(value: Any) -> str:
    if is_missing(value):
        return '<td data-v="">–</td>'
    text = _plain(value)
    return f'<td data-v="{e(value)}">{e(text)}</td>'


def _num_cell(value: Any, spec: str, *, text: str | None = None, best: bool = False, title: str = "") -> str:
    missing = is_missing(value)
    v = "" if missing else repr(float(value))
    text = text if text is not None else fmt_value(None if missing else value, spec)
    cls = "num best" if best else "num"
    tip = f' title="{e(title)}"' if title else ""
    return f'<td class="{cls}" data-v="{e(v)}"{tip}>{e(text)}</td>'


def best_cells(runs: pd.DataFrame, columns: list[Column]) -> set[tuple[Any, str]]:
    """(row index, metric) of the best value of each metric within each dataset."""
    out: set[tuple[Any, str]] = set()
    groups = runs.groupby(runs["dataset"].astype(str)) if "dataset" in runs else [("", runs)]
    for _, group in groups:
        for c in columns:
            if not c.better or c.key not in group:
                continue
            values = group[c.key].dropna()
            if len(values) < 2:
                continue
            target = values.max() if c.better > 0 else values.min()
            out.update((i, c.key) for i in values.index[values == target])
    return out


def references_section(data: ReportData) -> str:
    """The file's `reference:` entries beside our numbers, flagged where they are beyond tolerance."""
    refs = data.references
    if refs is None or refs.empty:
        return ""
    fmt = "{:.4g}"
    head = ["<th>metric</th>", "<th>cells</th>", "<th>run</th>", '<th class="num">ours</th>',
            '<th class="num">published</th>', '<th class="num">difference</th>', '<th class="num">tolerance</th>',
            "<th>status</th>", "<th>source</th>"]
    rows = []
    for _, r in refs.iterrows():
        run_id = r["run_id"] if isinstance(r["run_id"], str) else None
        link = data.run_link(run_id) if run_id else None
        name = "–" if is_missing(r["run_name"]) else str(r["run_name"])
        run = f'<a href="{e(link)}">{e(name)}</a>' if link else e(name)
        flagged = r["status"] == "beyond"
        cells = [f'<td data-v="{e(r["metric"])}">{e(METRIC_LABELS.get(r["metric"], r["metric"]))}</td>',
                 f'<td data-v="{e(r["where"])}">{e(r["where"])}</td>', f'<td data-v="{e(name)}">{run}</td>',
                 _num_cell(r["ours"], fmt), _num_cell(r["published"], fmt),
                 _num_cell(r["difference"], "{:+.4g}"), _num_cell(r["tolerance"], "±{:.4g}"),
                 f'<td class="{"error" if flagged else ""}" data-v="{e(r["status"])}">'
                 f'{"⚠ " if flagged else ""}{e(r["status"])}</td>',
                 f'<td class="source" data-v="{e(r["source"])}">{e(r["source"])}</td>']
        rows.append(f'<tr class="{"beyond" if flagged else ""}">' + "".join(cells) + "</tr>")
    compared = refs[refs["status"].isin(["within", "beyond"])]
    beyond = int((compared["status"] == "beyond").sum())
    note = (f'<p class="small">The published numbers the experiments file names (<code>reference:</code>), '
            f"beside ours: difference = ours − published. {beyond} of {len(compared)} compared values "
            "are beyond their stated tolerance (⚠). A selection of several runs (seeds) also gets the "
            "mean over them.</p>")
    return note + _table("references-table", head, rows)


def seeds_section(data: ReportData) -> str:
    runs = data.runs
    if runs.empty or "seed" not in runs or runs["seed"].nunique() < 2:
        return ""
    axes = [a for a in shown_axes(data, runs) if a != "seed"]
    metrics = [m for m in SEED_TABLE if m in runs and runs[m].notna().any()]
    keyed = runs.assign(**{f"_k{i}": runs[a].map(_plain).where(runs[a].notna(), "–") for i, a in enumerate(axes)})
    keys = [f"_k{i}" for i in range(len(axes))]
    rows = []
    for values, group in keyed.groupby(keys, sort=False, dropna=False) if keys else [((), keyed)]:
        values = values if isinstance(values, tuple) else (values,)
        cells = [f'<td data-v="{e(v)}">{e(v)}</td>' for v in values]
        cells.append(f'<td class="num" data-v="{len(group)}">{len(group)}</td>')
        for m in metrics:
            col = group[m].dropna()
            if col.empty:
                cells.append('<td class="num" data-v="">–</td>')
                continue
            spec = next(c.fmt for c in METRIC_COLUMNS if c.key == m)
            sd = col.std(ddof=1) if len(col) > 1 else math.nan
            text = fmt_value(col.mean(), spec) + ("" if math.isnan(sd) else " ± " + fmt_value(sd, spec))
            cells.append(f'<td class="num" data-v="{float(col.mean())!r}">{e(text)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = [f"<th>{e(a)}</th>" for a in axes] + ['<th class="num">seeds</th>'] + [
        f'<th class="num">{e(METRIC_LABELS.get(m, m))}</th>' for m in metrics]
    return ("<p class=\"small\">Runs that differ only in their seed, as mean ± standard deviation over "
            "the seeds (sample sd). Differences between settings smaller than the spread are noise.</p>"
            + _table("seeds-table", head, rows))


def failed_section(data: ReportData) -> str:
    failed = data.failed
    if failed.empty:
        return ""
    axes = shown_axes(data, failed)
    head = ["<th>run</th>", "<th>status</th>"] + [f"<th>{e(a)}</th>" for a in axes] + ["<th>started</th>", "<th>error</th>"]
    rows = []
    for _, row in failed.iterrows():
        link = data.run_link(row["run_id"])
        name = f'<a href="{e(link)}">{e(row["run_name"])}</a>' if link else e(row["run_name"])
        cells = [f'<td data-v="{e(row["run_name"])}" title="run {e(row["run_id"])}, key {e(row["run_key"])}">{name}</td>',
                 f'<td data-v="{e(row["status"])}">{e(row["status"])}</td>']
        cells += [_axis_cell(row[a]) for a in axes]
        cells.append(f'<td data-v="{e(row["start_time"])}">{e(when(row["start_time"]))}</td>')
        cells.append(f'<td class="error" data-v="{e(row["error"])}">{e(row["error"] or "no error recorded")}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return ("<p class=\"small\">Cells whose latest attempt did not finish and that have no finished run. "
            "<code>vaebench run</code> retries them (an interrupted run resumes from its checkpoint).</p>"
            + _table("failed-table", head, rows))


# --- figures ------------------------------------------------------------------------------------


def figure_block(fig: ReportFigure) -> str:
    head = f'<figure class="plot" id="fig-{e(fig.id)}"><h3>{e(fig.title)}</h3>'
    if fig.png:
        img = f'<img alt="{e(fig.title)}" src="data:image/png;base64,{base64.b64encode(fig.png).decode()}">'
        return f'{head}{img}<figcaption><b>How to read this.</b> {e(fig.how_to_read)}</figcaption></figure>'
    if fig.error:
        return f'{head}<p class="error">This figure could not be drawn: {e(fig.error)}</p></figure>'
    return f'{head}<p class="skipped">Not drawn: {e(fig.skipped)}.</p></figure>'


def figures_section(figures: list[ReportFigure]) -> str:
    return "\n".join(figure_block(f) for f in figures)


def studies_section(data: ReportData, study_figures: list[list[ReportFigure]]) -> str:
    if not data.studies:
        return ""
    parts = []
    for study, figures in zip(data.studies, study_figures):
        parts.append(f"<h3>study {e(study.name)}</h3>" + study_summary(study))
        parts += [figure_block(f) for f in figures if f.png or f.error]
        skipped = [f for f in figures if not f.png and not f.error and f.id.endswith("importances")]
        parts += [f'<p class="skipped">{e(f.title)}: not available ({e(f.skipped)}).</p>' for f in skipped]
        parts += [f'<p class="small">Note: {e(n)}</p>' for n in study.notes if "importance" not in n]
        parts.append(trials_table(data, study))
    return "\n".join(parts)


def trials_table(data: ReportData, study: Study) -> str:
    trials = study.trials
    if trials.empty:
        return ""
    values = [f"value {i}" for i in range(len(study.objectives))]
    head = ['<th class="num">trial</th>', "<th>state</th>"] + [
        f'<th class="num">{e(n)} ({e(d)})</th>' for n, d in zip(study.objectives, study.directions)] + [
        f"<th>{e(p)}</th>" for p in study.params] + ["<th>run</th>"]
    rows = []
    for _, t in trials.iterrows():
        link = data.run_link(t["run_id"]) if isinstance(t["run_id"], str) else None
        run = t["run_name"] if isinstance(t["run_name"], str) else ""
        cells = [_num_cell(t["number"], "{:.0f}"), f'<td data-v="{e(t["state"])}">{e(t["state"])}</td>']
        cells += [_num_cell(t[v], "{:.4g}") for v in values]
        cells += [_axis_cell(t[f"param {p}"]) for p in study.params]
        cells.append(f'<td data-v="{e(run)}">' + (f'<a href="{e(link)}">{e(run)}</a>' if link else e(run)) + "</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return '<details class="trials"><summary>all trials</summary>' + _table("", head, rows) + "</details>"


def study_summary(study: Study) -> str:
    trials = study.trials
    objectives = ", ".join(f"{n} ({d})" for n, d in zip(study.objectives, study.directions))
    counts = ", ".join(f"{v} {k.lower()}" for k, v in trials["state"].value_counts().items()) if len(trials) else "none"
    best = ""
    if len(study.objectives) == 1 and len(trials):
        done = trials[(trials["state"] == "COMPLETE") & trials["value 0"].notna()]
        if len(done):
            pick = done.loc[done["value 0"].idxmax() if study.directions[0] == "maximize" else done["value 0"].idxmin()]
            params = ", ".join(f"{p} = {_plain(pick[f'param {p}'])}" for p in study.params if not is_missing(pick[f"param {p}"]))
            best = (f"<br>best trial: #{int(pick['number'])} with {e(fmt_value(pick['value 0'], '{:.4g}'))}"
                    f"{(' (' + e(params) + ')') if params else ''}")
    return (f'<p class="small">objective: {e(objectives)}; trials: {e(counts)}; storage: '
            f'<code>{e(study.storage or "not recorded")}</code>{best}</p>')


# --- gallery ------------------------------------------------------------------------------------


def gallery_axes(data: ReportData) -> list[str]:
    runs = data.runs
    return [a for a in data.axes if a in runs and runs[a].astype(str).nunique() > 1]


def default_side_by_side(axes: list[str]) -> int:
    for preferred in ("model", "beta", "latent_dim", "reduction", "arch"):
        if preferred in axes:
            return axes.index(preferred)
    others = [i for i, a in enumerate(axes) if a not in ("dataset", "seed")]
    return others[0] if others else (len(axes) - 1)


def _sort_key(value: Any) -> Any:
    if is_missing(value):
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return str(value)


def gallery_section(data: ReportData) -> str:
    runs = data.runs
    shown = runs[runs["run_id"].isin(data.images.keys())] if len(runs) else runs
    if shown.empty:
        return ""
    axes = gallery_axes(data)
    by = default_side_by_side(axes) if axes else -1
    cards = []
    for order, (_, row) in enumerate(shown.iterrows()):
        values = [_plain(row[a]) if not is_missing(row[a]) else "–" for a in axes]
        keys = [_sort_key(row[a]) for a in axes]
        cards.append((order, row, values, keys))
    # the same grouping the page's script redoes when another axis is chosen
    groups: dict[str, list[tuple]] = {}
    for card in cards:
        rest = [v for i, v in enumerate(card[2]) if i != by]
        groups.setdefault(json.dumps(rest), []).append(card)
    rows = []
    for _, members in groups.items():
        members.sort(key=lambda c: (str(type(c[3][by])), c[3][by]) if by >= 0 else 0)
        first = members[0]
        title = ", ".join(f"{a}={v}" for i, (a, v) in enumerate(zip(axes, first[2])) if i != by) or "all runs"
        rows.append(f'<div class="gallery-row"><h4>{e(title)}{(" · by " + e(axes[by])) if by >= 0 else ""}</h4>'
                    f'<div class="cards">' + "".join(_card(data, *c, axes=axes) for c in members) + "</div></div>")
    options = "".join(f'<option value="{i}"{" selected" if i == by else ""}>{e(a)}</option>' for i, a in enumerate(axes))
    picker = (f'<label>side by side: <select id="gallery-axis">{options}</select></label> '
              "(runs in one row differ only in this axis)") if axes else ""
    return (f'<p class="small">Per run: test images with their reconstructions, samples from the prior '
            f'(VAEs), and the latent means coloured by label (PCA or t-SNE beyond 2 dims, as its title '
            f'says). {picker}</p>'
            f'<div id="gallery-grid" data-axes="{e(json.dumps(axes))}">' + "\n".join(rows) + "</div>")


def _card(data: ReportData, order: int, row: Any, values: list[str], keys: list[Any], *, axes: list[str]) -> str:
    from vaebench.report.collect import GALLERY

    link = data.run_link(row["run_id"])
    name = f'<a href="{e(link)}">{e(row["run_name"])}</a>' if link else e(row["run_name"])
    images = data.images.get(row["run_id"], {})
    pictures = []
    for file in GALLERY:
        if file in images:
            src = "data:image/png;base64," + base64.b64encode(images[file]).decode()
            pictures.append(f'<img alt="{e(GALLERY_CAPTIONS[file])} of {e(row["run_name"])}" '
                            f'title="{e(GALLERY_CAPTIONS[file])}" src="{src}">')
    return (f'<div class="card" data-order="{order}" data-values="{e(json.dumps(values))}" '
            f'data-sort="{e(json.dumps(keys))}"><div class="card-title">{name}</div>' + "".join(pictures) + "</div>")


STYLE = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #d9dde5; --best: #fff1b8; --bg: #fbfbfd; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); background: var(--bg); }
header, main, footer { max-width: 1500px; margin: 0 auto; padding: 0 20px; }
header { padding-top: 16px; }
h1 { margin: 0.2em 0; font-size: 26px; word-break: break-word; }
h2 { margin-top: 1.6em; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { margin: 1.2em 0 0.4em; }
h4 { margin: 0.8em 0 0.3em; font-weight: 600; color: var(--muted); }
.lead { font-size: 15px; }
.small, figcaption, footer { color: var(--muted); font-size: 13px; }
footer { margin: 3em auto 2em; }
nav { margin: 10px 0; padding: 8px 0; border-top: 1px solid var(--line); border-bottom: 1px solid var(--line); }
nav a { margin-right: 4px; }
code { background: #eef0f5; padding: 1px 4px; border-radius: 3px; word-break: break-all; }
.facts { display: flex; flex-wrap: wrap; gap: 24px; }
table.kv caption { text-align: left; font-weight: 600; }
table.kv th { text-align: left; padding-right: 12px; color: var(--muted); font-weight: 500; }
table.kv th, table.kv td { vertical-align: top; }
.scroll { overflow-x: auto; max-width: 100%; }
table.sortable { border-collapse: collapse; font-size: 13px; white-space: nowrap; }
table.sortable th, table.sortable td { border-bottom: 1px solid var(--line); padding: 3px 8px; text-align: left; }
table.sortable th { position: sticky; top: 0; background: #eef0f5; cursor: pointer; user-select: none; }
table.sortable th[aria-sort="ascending"]::after { content: " ▲"; }
table.sortable th[aria-sort="descending"]::after { content: " ▼"; }
table.sortable tbody tr:hover { background: #f1f4fb; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best, span.best { background: var(--best); font-weight: 600; }
td.error { white-space: normal; min-width: 300px; color: #9b1c1c; }
tr.beyond td { background: #fde8e8; }
#references-table td.error { min-width: 0; font-weight: 600; }
td.source { white-space: normal; min-width: 240px; }
p.error { color: #9b1c1c; }
p.skipped { color: var(--muted); font-style: italic; }
figure.plot { margin: 0 0 24px; }
figure.plot img { max-width: 100%; height: auto; border: 1px solid var(--line); background: white; }
figcaption { max-width: 900px; }
.gallery-row .cards { display: flex; gap: 12px; overflow-x: auto; padding-bottom: 8px; }
.card { flex: 0 0 300px; border: 1px solid var(--line); background: white; border-radius: 4px; padding: 6px; }
.card-title { font-size: 12px; font-weight: 600; margin-bottom: 4px; word-break: break-all; }
.card img { display: block; width: 100%; height: auto; margin-top: 4px; }
"""

SCRIPT = """
(function () {
  "use strict";
  function key(td) {
    var v = td ? td.getAttribute("data-v") : null;
    if (v === null || v === "") return null;
    var n = Number(v);
    return isNaN(n) ? v.toLowerCase() : n;
  }
  function compare(x, y) {
    if (x === null && y === null) return 0;
    if (x === null) return 1;
    if (y === null) return -1;
    if (typeof x !== typeof y) { x = String(x); y = String(y); }
    return x < y ? -1 : (x > y ? 1 : 0);
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      th.tabIndex = 0;
      function sort() {
        var ascending = th.getAttribute("aria-sort") !== "ascending";
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a.cells[col]), y = key(b.cells[col]);
          if (x === null || y === null) return compare(x, y);  // missing values last either way
          return ascending ? compare(x, y) : compare(y, x);
        });
        rows.forEach(function (r) { body.appendChild(r); });
      }
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (ev) {
        if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); sort(); }
      });
    });
  });

  var grid = document.getElementById("gallery-grid");
  var picker = document.getElementById("gallery-axis");
  if (!grid || !picker) return;
  var axes = JSON.parse(grid.getAttribute("data-axes"));
  picker.addEventListener("change", function () {
    var by = Number(picker.value);
    var cards = Array.prototype.slice.call(grid.querySelectorAll(".card"));
    cards.sort(function (a, b) { return Number(a.getAttribute("data-order")) - Number(b.getAttribute("data-order")); });
    var groups = [], index = {};
    cards.forEach(function (card) {
      var values = JSON.parse(card.getAttribute("data-values"));
      var rest = values.filter(function (_, i) { return i !== by; });
      var k = JSON.stringify(rest);
      if (!(k in index)) { index[k] = groups.length; groups.push({ values: values, cards: [] }); }
      groups[index[k]].cards.push(card);
    });
    grid.textContent = "";
    groups.forEach(function (group) {
      group.cards.sort(function (a, b) {
        return compare(JSON.parse(a.getAttribute("data-sort"))[by], JSON.parse(b.getAttribute("data-sort"))[by]);
      });
      var row = document.createElement("div");
      row.className = "gallery-row";
      var title = document.createElement("h4");
      var parts = [];
      axes.forEach(function (a, i) { if (i !== by) parts.push(a + "=" + group.values[i]); });
      title.textContent = (parts.join(", ") || "all runs") + " · by " + axes[by];
      var holder = document.createElement("div");
      holder.className = "cards";
      group.cards.forEach(function (c) { holder.appendChild(c); });
      row.appendChild(title);
      row.appendChild(holder);
      grid.appendChild(row);
    });
  });
})();
"""
