"""What the report calls things: the results table's metric columns and their labels, the record
of one comparison figure, and names made safe for files. The pages (html), the figures (plots)
and the package all speak it; it imports nothing of the report, so none of them imports another
for a word.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


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


@dataclass
class ReportFigure:
    id: str
    title: str
    how_to_read: str
    png: bytes | None = None
    skipped: str | None = None  # why the figure does not apply to this study
    error: str | None = None    # the figure failed to draw


def filename_safe(name: str) -> str:
    """A name (the experiment's, from the file) as a file name: letters, digits, `.`, `_` and `-`
    only, so never a path (no `/`, no leading dots), at most 100 characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:100] or "report"
