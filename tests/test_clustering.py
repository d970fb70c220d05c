"""Latent clustering scores: Hungarian accuracy against brute force, sklearn agreement, blobs vs noise."""

import itertools
import math

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from vaebench.clustering import SCORE_KEYS, cluster_scores, hungarian_accuracy


def brute_force_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Best accuracy over every injective map of clusters to labels (padding the smaller side)."""
    labels, clusters = np.unique(y_true), np.unique(y_pred)
    slots = list(labels) + [None] * max(0, len(clusters) - len(labels))  # None: an unmatched cluster
    best = 0
    for perm in itertools.permutations(slots, len(clusters)):
        mapping = dict(zip(clusters, perm))
        best = max(best, sum(mapping[p] == t for t, p in zip(y_true, y_pred)))
    return best / len(y_true)


def test_hungarian_is_one_for_a_relabelled_perfect_clustering() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, size=200)
    relabel = np.array([40, 3, 17, 5, 0, 99])  # arbitrary, non-contiguous cluster ids
    assert hungarian_accuracy(y, relabel[y]) == 1.0


@pytest.mark.parametrize("seed", range(12))
def test_hungarian_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k_true, k_pred = rng.integers(1, 6, size=2)  # also #clusters != #classes
    n = int(rng.integers(1, 40))
    y_true, y_pred = rng.integers(0, k_true, size=n), rng.integers(0, k_pred, size=n)
    assert hungarian_accuracy(y_true, y_pred) == pytest.approx(brute_force_accuracy(y_true, y_pred))


def test_hungarian_rejects_mismatched_lengths_and_is_nan_on_empty() -> None:
    with pytest.raises(ValueError):
        hungarian_accuracy(np.zeros(3), np.zeros(4))
    assert math.isnan(hungarian_accuracy(np.zeros(0), np.zeros(0)))


def blobs(n: int, k: int, dim: int, spread: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n points (n, dim) around k fixed centers (the same in every call), labels (n,) = i % k."""
    centers = np.random.default_rng(123).normal(size=(k, dim)) * 20.0  # the same for train and test
    y = np.arange(n) % k
    return centers[y] + spread * rng.normal(size=(n, dim)), y


def test_scores_on_well_separated_blobs_are_perfect() -> None:
    rng = np.random.default_rng(0)
    train_z, train_y = blobs(600, 4, 8, 0.5, rng)
    test_z, test_y = blobs(200, 4, 8, 0.5, rng)
    s = cluster_scores(train_z, train_y, test_z, test_y, n_classes=4)
    assert tuple(s) == SCORE_KEYS
    assert s["kmeans_acc"] == 1.0 and s["knn_acc"] == 1.0 and s["probe_acc"] == 1.0
    assert s["nmi"] == pytest.approx(1.0) and s["ari"] == pytest.approx(1.0)
    assert s["silhouette"] > 0.8


def test_scores_on_noise_are_at_chance() -> None:
    rng = np.random.default_rng(1)
    k = 5
    train_z, test_z = rng.normal(size=(1000, 6)), rng.normal(size=(500, 6))
    train_y, test_y = rng.integers(0, k, 1000), rng.integers(0, k, 500)
    s = cluster_scores(train_z, train_y, test_z, test_y, n_classes=k)
    assert abs(s["knn_acc"] - 1 / k) < 0.08
    assert abs(s["probe_acc"] - 1 / k) < 0.08
    assert 1 / k - 0.05 < s["kmeans_acc"] < 1 / k + 0.1  # the best matching is a little above chance
    assert s["nmi"] < 0.05 and abs(s["ari"]) < 0.03
    assert s["silhouette"] < 0.3


def test_nmi_and_ari_agree_with_sklearn_on_the_kmeans_clustering() -> None:
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(2)
    z, y = blobs(300, 3, 4, 15.0, rng)  # overlapping: an imperfect clustering
    s = cluster_scores(z, y, z, y, n_classes=3, seed=7, kmeans_restarts=4)
    pred = KMeans(n_clusters=3, n_init=4, random_state=7).fit_predict(z)
    assert s["nmi"] == pytest.approx(normalized_mutual_info_score(y, pred))
    assert s["ari"] == pytest.approx(adjusted_rand_score(y, pred))
    assert s["kmeans_acc"] == pytest.approx(hungarian_accuracy(y, pred))
    # permuting the cluster ids changes none of the three
    perm = np.array([2, 0, 1])
    assert hungarian_accuracy(y, perm[pred]) == pytest.approx(s["kmeans_acc"])
    assert normalized_mutual_info_score(y, perm[pred]) == pytest.approx(s["nmi"])
    assert adjusted_rand_score(y, perm[pred]) == pytest.approx(s["ari"])


def test_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(3)
    z, y = blobs(400, 4, 5, 10.0, rng)
    a = cluster_scores(z[:300], y[:300], z[300:], y[300:], n_classes=4, seed=3, silhouette_samples=50)
    b = cluster_scores(z[:300], y[:300], z[300:], y[300:], n_classes=4, seed=3, silhouette_samples=50)
    assert a == b


def test_constant_latents_do_not_crash() -> None:
    y = np.arange(100) % 10
    s = cluster_scores(np.zeros((100, 4)), y, np.ones((50, 4)), y[:50], n_classes=10)
    assert tuple(s) == SCORE_KEYS
    assert math.isnan(s["silhouette"])
    assert all(math.isnan(v) or math.isfinite(v) for v in s.values())
    assert 0.0 <= s["kmeans_acc"] <= 1.0 and 0.0 <= s["probe_acc"] <= 1.0


@pytest.mark.parametrize("case", ["one_class", "fewer_points_than_classes", "non_finite", "images"])
def test_degenerate_inputs(case: str) -> None:
    rng = np.random.default_rng(4)
    train_z, test_z = rng.normal(size=(30, 3)), rng.normal(size=(20, 3))
    train_y, test_y = np.arange(30) % 3, np.arange(20) % 3
    kwargs = {"n_classes": 3}
    if case == "one_class":
        train_y, test_y = np.zeros(30, int), np.zeros(20, int)
    elif case == "fewer_points_than_classes":
        test_z, test_y, kwargs = test_z[:2], test_y[:2], {"n_classes": 10}
    elif case == "non_finite":
        train_z[3, 1] = np.nan
    elif case == "images":  # (N, C, H, W) pixels are flattened, the raw-pixel baseline
        train_z, test_z = rng.random((30, 1, 4, 4)), rng.random((20, 1, 4, 4))
    s = cluster_scores(train_z, train_y, test_z, test_y, **kwargs)
    assert tuple(s) == SCORE_KEYS
    assert all(math.isnan(v) or -1.0 <= v <= 1.0 for v in s.values())
    if case == "non_finite":
        assert all(math.isnan(v) for v in s.values())
    if case == "one_class":
        assert s["knn_acc"] == s["probe_acc"] == 1.0  # the one train class is always right
        assert s["nmi"] == pytest.approx(0.0, abs=1e-12) or math.isnan(s["nmi"])
