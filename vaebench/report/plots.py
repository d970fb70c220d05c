"""The report's comparison figures: each answers one question about the runs of a study.

Every figure is drawn with seaborn on a `matplotlib.figure.Figure` with its own Agg canvas (no
pyplot, no global state; styles are applied in a context that is undone afterwards) and returned
as PNG bytes. A figure that does not apply to a study (one latent size, no VAE, no clustering
scores) is returned with the reason instead of a picture; a figure that fails to draw is returned
with its error, so one bad figure never costs the whole report.

Spread over seeds: where runs differ only in their seed, line plots show the mean over the seeds
with +-1 standard deviation (seaborn's `errorbar="sd"`: error bars over the few values of a matrix
axis, a band along learning curves); with one seed, plain lines.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import TYPE_CHECKING, Any, Callable

from vaebench.clustering import SCORE_KEYS
from vaebench.report.vocabulary import METRIC_LABELS, ReportFigure

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from vaebench.report.collect import ReportData, Study

DPI = 100
PANEL = (4.2, 3.2)  # inches per facet
REDUCTION_COLOURS = {"sum": "#1f77b4", "mean": "#d62728"}
MAX_HUE_GROUPS = 10  # more curves than this: colour by family instead, one thin line per run


# --- helpers ------------------------------------------------------------------------------------


def new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def facets(rows: int, cols: int, extra_width: float = 1.8) -> tuple[Figure, Any]:
    fig = new_figure(PANEL[0] * cols + extra_width, PANEL[1] * rows + 0.3)
    return fig, fig.subplots(rows, cols, squeeze=False)


def to_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # vaebench.figures.quiet_layout's filter, written out: that module imports torch, which a report never needs
    with warnings.catch_warnings():  # too small for its labels: drawn without the layout, not warned about
        warnings.filterwarnings("ignore", message="constrained_layout not applied", category=UserWarning)
        fig.savefig(buf, format="png", dpi=DPI)
    fig.clear()
    return buf.getvalue()


def style():
    """seaborn's whitegrid look for the duration of a `with` block (rcParams restored after)."""
    import seaborn as sns

    return sns.axes_style("whitegrid", {"grid.linestyle": ":"})


def present(df: pd.DataFrame, metrics: list[str] | tuple[str, ...]) -> list[str]:
    return [m for m in metrics if m in df and df[m].notna().any()]


def varying(df: pd.DataFrame, columns: list[str]) -> list[str]:
    """The columns that take more than one value in df."""
    return [c for c in columns if c in df and df[c].astype(str).nunique(dropna=True) > 1]


def settings_label(df: pd.DataFrame, columns: list[str]) -> pd.Series:
    """One label per row from the values of `columns`: `latent_dim=2, beta=4`."""
    if not columns:
        return df.index.to_series().map(lambda _: "all runs")
    # `$` would start matplotlib's mathtext in a legend: keep it literal
    return df[columns].apply(lambda r: ", ".join(f"{c}={fmt(r[c])}" for c in columns).replace("$", r"\$"), axis=1)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:g}"
    return str(value)


def errorbar(df: pd.DataFrame) -> Any:
    """Mean +- sd over seeds when there is more than one seed, else no band."""
    return "sd" if "seed" in df and df["seed"].nunique() > 1 else None


def stochastic(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["test/elbo"].notna()] if "test/elbo" in df else df.iloc[0:0]


def datasets(df: pd.DataFrame) -> list[str]:
    return sorted(df["dataset"].dropna().astype(str).unique()) if "dataset" in df else []


def outside_legend(ax: Any, title: str | None = None) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    if handles:
        ax.legend(handles, labels, title=title, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                  frameon=False, fontsize="small", title_fontsize="small")


def label_of(metric: str) -> str:

    return METRIC_LABELS.get(metric, metric)


def by_dataset(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    return [(name, df[df["dataset"].astype(str) == name]) for name in datasets(df)]


# --- the study's runs ---------------------------------------------------------------------------


def effective_beta_figure(data: ReportData) -> Figure | str:
    import seaborn as sns

    df = stochastic(data.runs)
    if df.empty or "effective_beta" not in df:
        return "no VAE runs: beta only weighs the KL term of stochastic models"
    if df["effective_beta"].nunique() < 2:
        return f"every VAE run has the same effective beta ({fmt(float(df['effective_beta'].iloc[0]))})"
    metrics = present(df, ["test/elbo", "test/recon_bce"])
    others = varying(df, [a for a in data.axes if a not in ("dataset", "beta", "reduction", "seed")])
    df = df.assign(settings=settings_label(df, others))
    groups = by_dataset(df)
    fig, axes = facets(len(groups), len(metrics))
    hue_order = [r for r in ("sum", "mean") if r in set(df["reduction"])] + sorted(
        set(df["reduction"].astype(str)) - {"sum", "mean"})
    for i, (name, sub) in enumerate(groups):
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            legend = i == 0 and j == len(metrics) - 1
            sns.lineplot(data=sub, x="effective_beta", y=metric, hue="reduction", hue_order=hue_order,
                         palette={**REDUCTION_COLOURS, **{h: "grey" for h in hue_order if h not in REDUCTION_COLOURS}},
                         style="settings" if others else None, markers=True if others else False,
                         marker=None if others else "o", dashes=bool(others), err_style="bars", err_kws={"capsize": 3},
                         errorbar=errorbar(sub), ax=ax, legend="auto" if legend else False)
            if df["effective_beta"].min() > 0:
                ax.set_xscale("log")
            else:  # beta = 0 (a plain autoencoder objective) has no place on a log axis
                ax.set_xscale("symlog", linthresh=max(float(df["effective_beta"][df["effective_beta"] > 0].min()
                                                            if (df["effective_beta"] > 0).any() else 1.0), 1e-3))
            ax.set_title(f"{name}: {label_of(metric)}", fontsize="medium")
            ax.set_xlabel("effective beta (KL weight of the sum objective)")
            ax.set_ylabel(label_of(metric))
            if legend:
                outside_legend(ax)
    return fig


def rate_distortion_figure(data: ReportData) -> Figure | str:
    import seaborn as sns

    df = stochastic(data.runs)
    if df.empty or not present(df, ["test/kl"]) or not present(df, ["test/recon_bce"]):
        return "no VAE runs with a KL and a reconstruction error"
    groups = by_dataset(df)
    fig, axes = facets(1, len(groups))
    betas = df["effective_beta"] if "effective_beta" in df else None
    for j, (name, sub) in enumerate(groups):
        ax = axes[0][j]
        legend = j == len(groups) - 1
        colour: dict[str, Any] = {}
        if betas is not None and betas.nunique() <= 8:  # a few matrix values: one colour each
            sub = sub.assign(**{"effective beta": sub["effective_beta"].map(fmt)})
            colour = dict(hue="effective beta", palette="viridis",
                          hue_order=[fmt(b) for b in sorted(betas.dropna().unique())])
        elif betas is not None:  # many (a search): a continuous, logarithmic scale
            from matplotlib.colors import LogNorm, Normalize

            low, high = float(betas.min()), float(betas.max())
            sub = sub.assign(**{"effective beta": sub["effective_beta"]})
            colour = dict(hue="effective beta", palette="viridis",
                          hue_norm=LogNorm(low, high) if low > 0 else Normalize(low, high))
        sns.scatterplot(data=sub, x="test/kl", y="test/recon_bce", **colour,
                        style="reduction" if df["reduction"].nunique() > 1 else None, s=55, alpha=0.85, ax=ax,
                        legend=("brief" if "hue_norm" in colour else "auto") if legend else False)
        ax.set_title(f"{name}: rate vs distortion", fontsize="medium")
        ax.set_xlabel("rate: KL(q(z|x) || p(z)) [nats/image]")
        ax.set_ylabel("distortion: reconstruction BCE [nats/image]")
        if legend:
            outside_legend(ax)
    return fig


def latent_size_figure(data: ReportData) -> Figure | str:
    import seaborn as sns

    df = data.runs
    if df.empty or df["latent_dim"].nunique() < 2:
        return "the study has one latent size"
    metrics = present(df, ["test/nll_iw", "test/kmeans_acc", "test/nmi", "test/knn_acc"])
    if not metrics:
        return "no NLL or clustering scores"
    others = varying(df, [a for a in data.axes if a not in ("dataset", "latent_dim", "model", "arch", "seed")])
    df = df.assign(family=df["model"].astype(str) + "/" + df["arch"].astype(str),
                   settings=settings_label(df, others))
    groups = by_dataset(df)
    fig, axes = facets(len(groups), len(metrics))
    sizes = sorted(df["latent_dim"].dropna().unique())
    for i, (name, sub) in enumerate(groups):
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            legend = i == 0 and j == len(metrics) - 1
            sns.lineplot(data=sub[sub[metric].notna()], x="latent_dim", y=metric, hue="family",
                         hue_order=sorted(df["family"].unique()), style="settings" if others else None,
                         markers=True if others else False, marker=None if others else "o",
                         dashes=bool(others), err_style="bars", err_kws={"capsize": 3}, errorbar=errorbar(sub), ax=ax,
                         legend="auto" if legend else False)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [str(int(s)) for s in sizes])
            ax.minorticks_off()
            ax.set_title(f"{name}: {label_of(metric)}", fontsize="medium")
            ax.set_xlabel("latent size")
            ax.set_ylabel(label_of(metric))
            if legend:
                outside_legend(ax)
    return fig


def baseline_figure(data: ReportData) -> Figure | str:
    import pandas as pd
    import seaborn as sns

    df = data.runs
    scores = [s for s in SCORE_KEYS if present(df, [f"test/{s}"])]
    if df.empty:
        return "no finished runs yet"
    if not scores:  # clustering off, or datasets of one class (nothing to cluster by)
        return "no clustering scores (evaluate.clustering is off, or the datasets have one class)"
    long = df.melt(id_vars=["run_id", "dataset", "model"], value_vars=[f"test/{s}" for s in scores],
                   var_name="score", value_name="value").dropna(subset=["value"])
    long["score"] = long["score"].str.removeprefix("test/")
    groups = by_dataset(df)
    fig, axes = facets(len(groups), 1, extra_width=2.6)
    fig.set_size_inches(max(7.0, 1.25 * len(scores) + 2.6), PANEL[1] * len(groups) + 0.3)
    families = sorted(df["model"].astype(str).unique())
    for i, (name, sub) in enumerate(groups):
        ax = axes[i][0]
        points = long[long["dataset"].astype(str) == name]
        sns.stripplot(data=points, x="score", y="value", order=list(scores), hue="model", hue_order=families,
                      dodge=len(families) > 1, jitter=0.15, size=5, alpha=0.8, ax=ax, legend=i == 0)
        base = [pd.to_numeric(sub.get(f"baseline/{s}"), errors="coerce").mean() if f"baseline/{s}" in sub
                else math.nan for s in scores]
        ax.scatter(range(len(scores)), base, marker="_", s=1400, linewidths=2.5, color="black", zorder=5)
        ax.set_title(f"{name}: clustering of the latent space vs raw pixels", fontsize="medium")
        ax.set_xlabel("")
        ax.set_ylabel("score")
        if i == 0:
            from matplotlib.lines import Line2D

            ax.add_line(Line2D([], [], color="black", lw=2.5, label="raw pixels (baseline)"))
            outside_legend(ax)
    return fig


def learning_curves_figure(data: ReportData) -> Figure | str:
    import pandas as pd
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    if not data.histories:
        return "no per-epoch validation metrics were logged"
    frames = [h.assign(run_id=run_id) for run_id, h in data.histories.items()]
    long = pd.concat(frames, ignore_index=True).merge(data.runs, on="run_id", suffixes=("", "_run"))
    metrics = present(long, ["val/neg_elbo", "val/recon"])
    if long.empty or not metrics:
        return "no per-epoch validation metrics were logged"
    others = varying(data.runs, [a for a in data.axes if a not in ("dataset", "seed")])
    long = long.assign(settings=settings_label(long, others))
    groups = by_dataset(long)
    many = long["settings"].nunique() > MAX_HUE_GROUPS
    hue = "model" if many else "settings"  # too many settings to tell apart: colour by family
    levels = sorted(long[hue].astype(str).unique())
    palette = dict(zip(levels, sns.color_palette("tab10" if len(levels) <= 10 else "husl", len(levels))))
    fig, axes = facets(len(groups), len(metrics), extra_width=3.2)
    for i, (name, sub) in enumerate(groups):
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            legend = i == 0 and j == len(metrics) - 1
            curve = sub[sub[metric].notna()].astype({hue: str})
            if many:  # one thin line per run
                sns.lineplot(data=curve, x="step", y=metric, hue=hue, hue_order=levels, palette=palette,
                             units="run_id", estimator=None, lw=0.8, alpha=0.6, ax=ax,
                             legend="auto" if legend else False)
            else:
                sns.lineplot(data=curve, x="step", y=metric, hue=hue, hue_order=levels, palette=palette,
                             errorbar=errorbar(curve), marker="o", markersize=3, ax=ax,
                             legend="auto" if legend else False)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"{name}: {label_of(metric)} per epoch", fontsize="medium")
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"{label_of(metric)} [nats/image]")
            if legend:
                outside_legend(ax, "family (one line per run)" if many else None)
    return fig


# --- Optuna studies -----------------------------------------------------------------------------


def history_figure(study: Study) -> Figure | str:
    import seaborn as sns

    trials = study.trials
    if trials.empty:
        return "the study has no trials yet"
    n = len(study.objectives)
    fig, axes = facets(1, n, extra_width=2.2)
    for i, (name, direction) in enumerate(zip(study.objectives, study.directions)):
        ax = axes[0][i]
        column = f"value {i}"
        done = trials[(trials["state"] == "COMPLETE") & trials[column].notna()].sort_values("number")
        other = trials[(trials["state"] != "COMPLETE") & trials[column].notna()]
        if not done.empty:
            sns.scatterplot(data=done, x="number", y=column, ax=ax, s=40, color="#1f77b4", label="complete trial")
            best = done[column].cummax() if direction == "maximize" else done[column].cummin()
            ax.step(done["number"], best, where="post", color="#d62728", label="best so far")
        if not other.empty:
            sns.scatterplot(data=other, x="number", y=column, ax=ax, s=40, marker="X", color="grey",
                            label="pruned / failed (last value)")
        counts = trials["state"].value_counts()
        ax.set_title(f"{name} ({direction}); " + ", ".join(f"{v} {k.lower()}" for k, v in counts.items()),
                     fontsize="medium")
        ax.set_xlabel("trial")
        ax.set_ylabel(label_of(name))
        if i == n - 1:
            outside_legend(ax)
        elif ax.get_legend() is not None:
            ax.get_legend().remove()
    return fig


def importances_figure(study: Study) -> Figure | str:
    import pandas as pd
    import seaborn as sns

    if not study.importances:
        return "; ".join(n for n in study.notes if "importance" in n or "storage" in n) or \
            "parameter importances are not available"
    long = pd.DataFrame([{"objective": o, "parameter": p, "importance": v}
                         for o, imp in study.importances.items() for p, v in imp.items()])
    order = long.groupby("parameter")["importance"].mean().sort_values(ascending=False).index.tolist()
    fig = new_figure(7.5, 0.45 * len(order) + 1.6)
    ax = fig.add_subplot()
    sns.barplot(data=long, y="parameter", x="importance", order=order,
                hue="objective" if long["objective"].nunique() > 1 else None, ax=ax, orient="h")
    ax.set_title("hyperparameter importance (share of the objective's variation)", fontsize="medium")
    ax.set_xlabel("importance")
    ax.set_ylabel("")
    return fig


def pareto_figure(study: Study) -> Figure | str:
    import seaborn as sns

    if len(study.objectives) < 2:
        return "single-objective study"
    a, b = "value 0", "value 1"
    done = study.trials[(study.trials["state"] == "COMPLETE") & study.trials[a].notna() & study.trials[b].notna()]
    if done.empty:
        return "no complete trials yet"
    front = pareto_mask(done[[a, b]].to_numpy(), study.directions[:2])
    done = done.assign(front=["Pareto-optimal" if f else "dominated" for f in front])
    fig = new_figure(7.0, 4.8)
    ax = fig.add_subplot()
    sns.scatterplot(data=done, x=a, y=b, hue="front", hue_order=["Pareto-optimal", "dominated"],
                    palette={"Pareto-optimal": "#d62728", "dominated": "#9e9e9e"}, s=50, ax=ax)
    best = done[front].sort_values(a)
    ax.step(best[a], best[b], where="post", color="#d62728", lw=1, alpha=0.6)
    names = [f"{label_of(n)} ({d})" for n, d in zip(study.objectives, study.directions)]
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    title = "Pareto front" + (f" (first two of {len(study.objectives)} objectives)" if len(study.objectives) > 2 else "")
    ax.set_title(title, fontsize="medium")
    outside_legend(ax)
    return fig


def pareto_mask(values: Any, directions: list[str]) -> list[bool]:
    """values (N, M): True where no other row is at least as good in every objective and better in
    one (`directions` maximize/minimize per column)."""
    import numpy as np

    v = np.asarray(values, dtype=float) * np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    out = []
    for row in v:  # minimisation now
        dominated = np.any(np.all(v <= row, axis=1) & np.any(v < row, axis=1))
        out.append(not dominated)
    return out


# --- the registry -------------------------------------------------------------------------------

# id -> (title, how to read it, drawing function of the study's runs)
FIGURES: dict[str, tuple[str, str, Callable[[ReportData], Figure | str]]] = {
    "effective-beta": (
        "ELBO and reconstruction vs effective beta",
        "One line per loss reduction (`sum` in blue, `mean` in red), on one axis: a `mean` run with "
        "beta b weighs the KL like a `sum` run with beta b x D (D pixels), so both land where their "
        "real trade-off puts them. Higher ELBO is better; lower BCE is better. Expect reconstruction "
        "to get worse as the KL weight grows; a line that ends far right with a poor ELBO is a "
        "collapsed posterior.",
        effective_beta_figure),
    "rate-distortion": (
        "The rate-distortion plane",
        "One point per VAE run: rate (KL, the information the latent code carries) across, distortion "
        "(reconstruction BCE) up. Points low and to the left are better; the lower-left envelope is "
        "the trade-off the family achieves, and the KL weight (colour) moves runs along it. -ELBO is "
        "roughly rate + distortion, so lines at -45 degrees have equal ELBO.",
        rate_distortion_figure),
    "latent-size": (
        "Likelihood and clustering vs latent size",
        "Per dataset, the importance-weighted NLL (lower is better) and the clustering scores of the "
        "latent means (higher is better) against the latent size, one colour per family/architecture. "
        "NLL usually improves with more dimensions until extra units stay inactive; clustering scores "
        "often peak at small sizes.",
        latent_size_figure),
    "baseline": (
        "Clustering scores vs the raw-pixel baseline",
        "Each dot is one run's score on its latent means; the black bar is the same score on the raw "
        "pixels of the dataset. Dots above the bar: the latent space separates the classes better "
        "than the pixels do. k-means accuracy, NMI and ARI need no labels for training; kNN and the "
        "linear probe measure how linearly/locally separable the classes are.",
        baseline_figure),
    "learning-curves": (
        "Learning curves, overlaid",
        "Validation -ELBO (VAEs; the same objective for every run whatever it was trained with) and "
        "validation reconstruction error per epoch, both in nats per image, so runs with `sum` and "
        "`mean` reduction compare directly. A curve still falling at the last epoch wants more epochs; "
        "one rising again is overfitting.",
        learning_curves_figure),
}

STUDY_FIGURES: dict[str, tuple[str, str, Callable[[Study], Figure | str]]] = {
    "history": (
        "Optimisation history",
        "Each dot is one finished trial's objective value; the red step line is the best value so far. "
        "A line that stopped improving early says more trials will not help much; grey crosses are "
        "pruned or failed trials at their last reported value.",
        history_figure),
    "importances": (
        "Parameter importances",
        "How much of the variation of the objective each searched parameter explains (Optuna's "
        "importance evaluator over the complete trials; shares sum to 1). Narrow the search to the "
        "top parameters, fix the others.",
        importances_figure),
    "pareto": (
        "Pareto front",
        "Multi-objective studies: every complete trial by its first two objectives; red points are "
        "Pareto-optimal (no other trial is at least as good in both and better in one), the red line "
        "is the front. Pick a point on it for the trade-off you want.",
        pareto_figure),
}


def draw(id: str, title: str, note: str, fn: Callable[[Any], Figure | str], arg: Any) -> ReportFigure:
    figure = ReportFigure(id=id, title=title, how_to_read=note)
    try:
        with style():
            result = fn(arg)
            if isinstance(result, str):
                figure.skipped = result
            else:
                figure.png = to_png(result)
    except Exception as e:  # noqa: BLE001 - one bad figure must not cost the whole report
        figure.error = f"{type(e).__name__}: {e}"
    return figure


def draw_all(data: ReportData) -> list[ReportFigure]:
    if data.runs.empty:  # each figure is of the matrix's finished runs (a tuning study has its own)
        return [ReportFigure(id=id, title=title, how_to_read=note, skipped="no finished runs of the matrix yet")
                for id, (title, note, _) in FIGURES.items()]
    return [draw(id, title, note, fn, data) for id, (title, note, fn) in FIGURES.items()]


def draw_study(index: int, study: Study) -> list[ReportFigure]:
    return [draw(f"study{index}-{id}", title, note, fn, study) for id, (title, note, fn) in STUDY_FIGURES.items()]
