"""Tests for ihcc.metrics against hand-worked cases."""

import math

import numpy as np
import pytest

from ihcc import metrics

# true = [0, 0, 0, 1, 1, 1], pred = [0, 0, 1, 1, 2, 2], n = 6.
# Contingency cells 2, 1 / 1, 2. Sum of C(cell, 2) = 2; rows C(3, 2) * 2 = 6;
# columns C(2, 2) * 3 = 3; C(6, 2) = 15. Expected index 6 * 3 / 15 = 1.2, max index
# (6 + 3) / 2 = 4.5, so ARI = (2 - 1.2) / (4.5 - 1.2) = 8 / 33.
# MI = 2/6 ln 2 + 2/6 ln 2 = (2/3) ln 2, H(true) = ln 2, H(pred) = ln 3, so
# NMI (arithmetic mean) = (2/3) ln 2 / ((ln 2 + ln 3) / 2) = (4/3) ln 2 / ln 6.
HAND_TRUE = [0, 0, 0, 1, 1, 1]
HAND_PRED = [0, 0, 1, 1, 2, 2]
HAND_ARI = 8 / 33
HAND_NMI = (4 / 3) * math.log(2) / math.log(6)


def test_clustering_scores_perfect():
    scores = metrics.clustering_scores(["a", "a", "b", "c"], ["a", "a", "b", "c"])
    assert scores["nmi"] == pytest.approx(1.0)
    assert scores["ari"] == pytest.approx(1.0)


def test_clustering_scores_permuted_names():
    scores = metrics.clustering_scores(["kitchen", "kitchen", "car", "car", "desk"], [7, 7, 3, 3, 0])
    assert scores["nmi"] == pytest.approx(1.0)
    assert scores["ari"] == pytest.approx(1.0)


def test_clustering_scores_hand_case():
    scores = metrics.clustering_scores(HAND_TRUE, HAND_PRED)
    assert scores["ari"] == pytest.approx(HAND_ARI)
    assert scores["nmi"] == pytest.approx(HAND_NMI)


def test_clustering_scores_all_in_one_cluster():
    scores = metrics.clustering_scores([0, 0, 1, 1], [5, 5, 5, 5])
    assert scores["nmi"] == pytest.approx(0.0)
    assert scores["ari"] == pytest.approx(0.0)


def test_clustering_scores_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        metrics.clustering_scores([0, 1], [0])
    with pytest.raises(ValueError, match="at least one"):
        metrics.clustering_scores([], [])
    with pytest.raises(ValueError, match="1-D"):
        metrics.clustering_scores([[0, 1]], [[0, 1]])


def test_within_group_scores_by_hand():
    # Group "a" is labelled perfectly and scores 1 on both. Group "b" is the hand case.
    # Group "c" has one image and is skipped.
    groups = ["a"] * 4 + ["b"] * 6 + ["c"]
    true = ["x", "x", "y", "y"] + [str(t) for t in HAND_TRUE] + ["z"]
    pred = [1, 1, 2, 2] + HAND_PRED + [9]
    scores = metrics.within_group_scores(groups, true, pred)
    assert scores["groups"] == 2
    assert scores["skipped"] == 1
    assert scores["ari"] == pytest.approx((1.0 + HAND_ARI) / 2)
    assert scores["nmi"] == pytest.approx((1.0 + HAND_NMI) / 2)


def test_within_group_differs_from_pooled():
    # Each participant is split perfectly, but the cluster ids are reused across
    # participants, so the pooled score is below 1.
    groups = ["p0"] * 4 + ["p1"] * 4
    true = ["p0-kitchen", "p0-kitchen", "p0-car", "p0-car", "p1-desk", "p1-desk", "p1-bus", "p1-bus"]
    pred = [0, 0, 1, 1, 0, 0, 1, 1]
    within = metrics.within_group_scores(groups, true, pred)
    assert within["nmi"] == pytest.approx(1.0)
    assert within["ari"] == pytest.approx(1.0)
    assert metrics.clustering_scores(true, pred)["ari"] < 0.5


def test_per_group_scores_entries():
    scores = metrics.per_group_scores(["b", "b", "a", "a", "a"], [0, 1, 0, 0, 0], [0, 1, 3, 3, 3])
    assert list(scores) == ["a", "b"]
    assert scores["a"]["images"] == 3
    assert scores["b"]["ari"] == pytest.approx(1.0)


def test_within_group_single_true_class():
    # One true environment: pred with one cluster scores 1, a split scores 0 (scikit-learn).
    single_cluster = metrics.within_group_scores(["p"] * 3, ["home"] * 3, [4, 4, 4])
    assert single_cluster["nmi"] == pytest.approx(1.0)
    assert single_cluster["ari"] == pytest.approx(1.0)
    split = metrics.within_group_scores(["p"] * 3, ["home"] * 3, [4, 4, 5])
    assert split["nmi"] == pytest.approx(0.0)
    assert split["ari"] == pytest.approx(0.0)


def test_within_group_all_skipped_is_nan():
    scores = metrics.within_group_scores(["p0", "p1"], ["a", "b"], [0, 1])
    assert scores["groups"] == 0
    assert scores["skipped"] == 2
    assert math.isnan(scores["nmi"])
    assert math.isnan(scores["ari"])


def test_count_occupied():
    labels = [3, 3, 3, 1, 1, 7, 9, 9, 9, 9]
    assert metrics.count_occupied(labels) == 4
    assert metrics.count_occupied(labels, min_size=2) == 3
    assert metrics.count_occupied(labels, min_size=3) == 2
    assert metrics.count_occupied(labels, min_size=5) == 0
    assert metrics.count_occupied(["a", "b", "a"]) == 2
    assert metrics.count_occupied([]) == 0
    with pytest.raises(ValueError, match="min_size"):
        metrics.count_occupied(labels, min_size=0)


def test_trivial_participant_labelling():
    participants = ["p0", "p0", "p1", "p1"]
    true = ["p0-a", "p0-b", "p1-a", "p1-a"]
    labels = metrics.trivial_participant_labelling(participants)
    assert list(labels) == participants
    # Participant p1 has one environment and is labelled perfectly; p0 is merged.
    per_group = metrics.per_group_scores(participants, true, labels)
    assert per_group["p1"]["ari"] == pytest.approx(1.0)
    assert per_group["p0"]["ari"] == pytest.approx(0.0)


def _blobs(centres, per_centre, seed):
    rng = np.random.default_rng(seed)
    points = [c + 0.05 * rng.standard_normal((per_centre, len(c))) for c in np.asarray(centres, float)]
    labels = np.repeat(np.arange(len(centres)), per_centre)
    return np.concatenate(points), labels


def test_kmeans_baseline_pooled():
    features, true = _blobs([[0, 0], [5, 0], [0, 5]], per_centre=10, seed=0)
    labels = metrics.kmeans_baseline(features, 3, seed=0)
    assert labels.shape == (30,)
    assert metrics.clustering_scores(true, labels)["ari"] == pytest.approx(1.0)


def test_kmeans_baseline_within_groups():
    # Both groups reuse the same two centres; per-group k-means must still give
    # labels unique across groups.
    features_a, true_a = _blobs([[0, 0], [5, 5]], per_centre=6, seed=1)
    features_b, true_b = _blobs([[0, 0], [5, 5], [0, 5]], per_centre=6, seed=2)
    features = np.concatenate([features_a, features_b])
    groups = np.array(["a"] * 12 + ["b"] * 18)
    true = np.concatenate([true_a, true_b + 10])
    labels = metrics.kmeans_baseline(features, {"a": 2, "b": 3}, seed=0, groups=groups)
    assert metrics.count_occupied(labels) == 5
    assert not set(labels[groups == "a"]) & set(labels[groups == "b"])
    assert metrics.clustering_scores(true, labels)["ari"] == pytest.approx(1.0)


def test_kmeans_baseline_small_group_and_errors():
    features = np.arange(10, dtype=float).reshape(5, 2)
    labels = metrics.kmeans_baseline(features, 3, seed=0, groups=["a", "a", "a", "a", "b"])
    assert metrics.count_occupied(labels[:4]) == 3
    assert metrics.count_occupied(labels[4:]) == 1
    with pytest.raises(KeyError, match="'b'"):
        metrics.kmeans_baseline(features, {"a": 2}, seed=0, groups=["a", "a", "a", "a", "b"])
    with pytest.raises(ValueError, match="at least 1"):
        metrics.kmeans_baseline(features, 0, seed=0)
    with pytest.raises(ValueError, match="Lower n_clusters"):
        metrics.kmeans_baseline(features, 6, seed=0)
    with pytest.raises(ValueError, match="must be an int"):
        metrics.kmeans_baseline(features, {"a": 2}, seed=0)
