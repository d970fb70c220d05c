"""Latent clustering scores: how well the labels can be read off a set of codes.

Pure functions over numpy arrays (latents (N, K) float, labels (N,) int), so the same code scores
posterior means and, as the dataset's baseline, raw pixels flattened to (N, C*H*W).

  kmeans_acc  k-means (k = n_classes) on the test codes, accuracy under the best one-to-one matching
              of clusters to labels (Hungarian algorithm on the contingency matrix)
  nmi, ari    normalized mutual information and adjusted Rand index of the same k-means clustering
  silhouette  silhouette score of that clustering on a fixed-size seeded subsample (the full score is
              O(N^2)); NaN when it is undefined (fewer than 2 clusters)
  knn_acc     k-nearest-neighbour classifier fit on the train codes, accuracy on the test codes
  probe_acc   logistic-regression probe fit on the standardized train codes, accuracy on the test codes

Scaling: kNN uses the raw codes. Distances in a VAE latent are meaningful as they are (the prior is
N(0, I)), and standardizing would blow the inactive units (posterior means ~ constant, variance
~ 0) up to the same weight as the informative ones, i.e. add noise dimensions. The probe is
standardized with the train statistics because L2-regularized logistic regression and lbfgs
convergence depend on the feature scale; the accuracy of the unregularized optimum would not.

Degenerate inputs (constant codes, a single class, fewer points than clusters) give finite or NaN
scores, never an exception; non-finite codes (a diverged model) give NaN for every score.

scikit-learn and scipy are imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

SCORE_KEYS = ("kmeans_acc", "nmi", "ari", "silhouette", "knn_acc", "probe_acc")
PROBE_C = 1.0  # inverse L2 strength on standardized features: weak, the probe measures linear readability
PROBE_MAX_ITER = 1000  # lbfgs needs ~70 iterations on 4,000 standardized MNIST images (784 dims)
# BLAS/OpenMP threads while scoring. These problems are small (<= ~10^4 points): a k-means iteration
# is a few ms, so thread barriers dominate, and badly when the cores are shared with other runs of a
# sweep (measured on 2 shared cores: 500 x 6 k-means 3.7 s with 2 threads, 0.02 s with 1). The
# scores do not depend on the thread count.
THREADS = 1


def hungarian_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Accuracy of `y_pred` (cluster ids) against `y_true` (labels), both (N,), under the best
    one-to-one matching of clusters to labels. Ids need not be 0..k-1 and the number of clusters
    may differ from the number of classes: the points of unmatched clusters count as errors.
    NaN for empty input."""
    from scipy.optimize import linear_sum_assignment

    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {y_true.shape[0]} != {y_pred.shape[0]}")
    if y_true.size == 0:
        return math.nan
    _, t = np.unique(y_true, return_inverse=True)  # labels -> 0..L-1
    _, p = np.unique(y_pred, return_inverse=True)  # clusters -> 0..P-1
    counts = np.zeros((p.max() + 1, t.max() + 1), dtype=np.int64)  # (P, L) contingency matrix
    np.add.at(counts, (p, t), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)  # rectangular: min(P, L) pairs
    return float(counts[rows, cols].sum() / y_true.size)


def cluster_scores(
    train_z: np.ndarray,
    train_y: np.ndarray,
    test_z: np.ndarray,
    test_y: np.ndarray,
    *,
    n_classes: int,
    seed: int = 0,
    kmeans_restarts: int = 10,
    silhouette_samples: int = 1000,
    knn_neighbors: int = 5,
) -> dict[str, float]:
    """The clustering scores of SCORE_KEYS (module docstring) for train codes (N, K) with labels (N,)
    and test codes (M, K) with labels (M,). Unsupervised scores use the test split only; the
    classifiers are fit on train and scored on test. Deterministic for a given seed."""
    train_z, test_z = _as_codes(train_z), _as_codes(test_z)
    train_y, test_y = np.asarray(train_y).ravel(), np.asarray(test_y).ravel()
    if train_z.shape[0] != train_y.shape[0] or test_z.shape[0] != test_y.shape[0]:
        raise ValueError("codes and labels differ in length: "
                         f"train {train_z.shape[0]} vs {train_y.shape[0]}, test {test_z.shape[0]} vs {test_y.shape[0]}")
    if train_z.shape[1] != test_z.shape[1]:
        raise ValueError(f"train and test codes differ in width: {train_z.shape[1]} != {test_z.shape[1]}")
    scores = dict.fromkeys(SCORE_KEYS, math.nan)
    if test_z.shape[0] == 0 or not (np.isfinite(train_z).all() and np.isfinite(test_z).all()):
        return scores
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    with threadpool_limits(limits=THREADS):  # restored on exit
        scores.update(_scores(train_z, train_y, test_z, test_y, n_classes=n_classes, seed=seed,
                              kmeans_restarts=kmeans_restarts, silhouette_samples=silhouette_samples,
                              knn_neighbors=knn_neighbors))
    return scores


def _scores(train_z: np.ndarray, train_y: np.ndarray, test_z: np.ndarray, test_y: np.ndarray, *,
            n_classes: int, seed: int, kmeans_restarts: int, silhouette_samples: int,
            knn_neighbors: int) -> dict[str, float]:
    """The scores that are defined for these (finite, non-empty) inputs; the caller fills NaN."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

    scores: dict[str, float] = {}
    m = test_z.shape[0]
    with warnings.catch_warnings():
        # constant or duplicated codes: "Number of distinct clusters (1) found smaller than n_clusters"
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(n_clusters=max(1, min(n_classes, m)), n_init=kmeans_restarts, random_state=seed)
        clusters = km.fit_predict(test_z)  # (M,)
    scores["kmeans_acc"] = hungarian_accuracy(test_y, clusters)
    scores["nmi"] = float(normalized_mutual_info_score(test_y, clusters))
    scores["ari"] = float(adjusted_rand_score(test_y, clusters))
    try:
        # sample_size must be < M for sklearn to subsample; a seeded subsample keeps runs comparable
        size = min(silhouette_samples, m)
        scores["silhouette"] = float(silhouette_score(
            test_z, clusters, sample_size=size if size < m else None, random_state=seed))
    except ValueError:  # fewer than 2 clusters (in the subsample), or every point its own cluster
        pass

    if train_z.shape[0] > 0:
        scores["knn_acc"] = _knn_accuracy(train_z, train_y, test_z, test_y, knn_neighbors)
        scores["probe_acc"] = _probe_accuracy(train_z, train_y, test_z, test_y, seed)
    return scores


def _as_codes(z: np.ndarray) -> np.ndarray:
    """(N, ...) array-like -> (N, D) float64, images flattened (the raw-pixel baseline)."""
    z = np.asarray(z, dtype=np.float64)
    return z.reshape(z.shape[0], -1) if z.ndim != 2 else z


def _knn_accuracy(train_z: np.ndarray, train_y: np.ndarray, test_z: np.ndarray, test_y: np.ndarray,
                  k: int) -> float:
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=min(k, train_z.shape[0]))  # raw codes: see module docstring
    return float(knn.fit(train_z, train_y).score(test_z, test_y))


def _probe_accuracy(train_z: np.ndarray, train_y: np.ndarray, test_z: np.ndarray, test_y: np.ndarray,
                    seed: int) -> float:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    classes = np.unique(train_y)
    if classes.size < 2:  # nothing to fit: the only sensible classifier predicts the one train class
        return float(np.mean(test_y == classes[0]))
    # train statistics only; constant features (blank border pixels, dead units) keep scale 1
    mean, std = train_z.mean(0), train_z.std(0)  # (D,)
    std[std < 1e-8] = 1.0
    probe = LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a nearly converged probe still scores
        probe.fit((train_z - mean) / std, train_y)
    return float(probe.score((test_z - mean) / std, test_y))
