"""Clustering scores for personal environments and environment types, and baselines.

Scores are scikit-learn's normalized mutual information (NMI, arithmetic-mean
normalisation, the scikit-learn default) and adjusted Rand index (ARI). Labels may be
any hashable values of one kind (all strings or all integers). The numbering of
predicted clusters does not matter.

Within-group convention (within_group_scores):
- A group with fewer than 2 images is skipped and counted in "skipped", because any
  labelling of one image scores 1.0 and would inflate the average.
- Other groups use scikit-learn's values unchanged. If a group has one true class and
  the prediction also puts all its images in one cluster, NMI = ARI = 1.0. If the
  prediction splits a one-class group, NMI = ARI = 0.0 (scikit-learn 1.9).
- The average is unweighted over the scored groups. With no scored group, nmi and ari
  are NaN.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def _scalar(value):
    """Return a numpy scalar as the Python value; leave Python objects (e.g. str) as they are."""
    return value.item() if isinstance(value, np.generic) else value


def _as_labels(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of labels, got shape {array.shape}.")
    return array


def _check_same_length(**arrays: np.ndarray) -> int:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"label sequences must have the same length, got {lengths}.")
    return next(iter(lengths.values()))


def clustering_scores(true: Sequence, pred: Sequence) -> dict[str, float]:
    """Score a predicted clustering against true labels: {"nmi": ..., "ari": ...}."""
    true = _as_labels(true, "true")
    pred = _as_labels(pred, "pred")
    if _check_same_length(true=true, pred=pred) == 0:
        raise ValueError("clustering_scores needs at least one labelled image, got none.")
    return {
        "nmi": float(normalized_mutual_info_score(true, pred)),
        "ari": float(adjusted_rand_score(true, pred)),
    }


def per_group_scores(groups: Sequence, true: Sequence, pred: Sequence) -> dict:
    """Score each group (participant) with at least 2 images separately.

    Returns {group: {"nmi": ..., "ari": ..., "images": n}} for the scored groups, in
    sorted group order. Groups with fewer than 2 images are left out.
    """
    groups = _as_labels(groups, "groups")
    true = _as_labels(true, "true")
    pred = _as_labels(pred, "pred")
    _check_same_length(groups=groups, true=true, pred=pred)

    scores = {}
    for group in np.unique(groups):
        members = groups == group
        count = int(members.sum())
        if count < 2:
            continue
        scores[_scalar(group)] = {**clustering_scores(true[members], pred[members]), "images": count}
    return scores


def within_group_scores(groups: Sequence, true: Sequence, pred: Sequence) -> dict:
    """Average NMI and ARI over groups (participants), unweighted.

    Returns {"nmi", "ari", "groups": number of scored groups, "skipped": number of groups
    with fewer than 2 images}. The module docstring gives the convention for degenerate
    groups.
    """
    scores = per_group_scores(groups, true, pred)
    total_groups = len(np.unique(_as_labels(groups, "groups")))
    if scores:
        nmi = float(np.mean([s["nmi"] for s in scores.values()]))
        ari = float(np.mean([s["ari"] for s in scores.values()]))
    else:
        nmi = ari = float("nan")
    return {"nmi": nmi, "ari": ari, "groups": len(scores), "skipped": total_groups - len(scores)}


def count_occupied(labels: Sequence, min_size: int = 1) -> int:
    """Return the number of distinct labels with at least min_size members."""
    if min_size < 1:
        raise ValueError(f"count_occupied: min_size must be at least 1, got {min_size}.")
    labels = _as_labels(labels, "labels")
    if len(labels) == 0:
        return 0
    _, counts = np.unique(labels, return_counts=True)
    return int((counts >= min_size).sum())


def trivial_participant_labelling(participants: Sequence) -> np.ndarray:
    """Label every image with its participant: the one-environment-per-participant baseline."""
    return _as_labels(participants, "participants").copy()


def kmeans_baseline(
    features: np.ndarray,
    n_clusters: int | Mapping,
    seed: int,
    groups: Sequence | None = None,
) -> np.ndarray:
    """Cluster feature vectors with k-means and return integer labels, one per row.

    features: float array [N, D]. Without groups, n_clusters is an int and k-means runs
    on all rows. With groups, k-means runs separately inside each group, and n_clusters
    is an int for every group or a mapping from group to its cluster count (such as the
    true number of environments per participant). A group with fewer rows than its
    cluster count gets one cluster per row. Labels are unique across groups: group g's
    clusters are numbered after those of the groups sorted before it.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) == 0:
        raise ValueError(
            f"kmeans_baseline: features must be a non-empty [N, D] array, got shape {features.shape}."
        )
    if groups is None:
        if not isinstance(n_clusters, (int, np.integer)):
            raise ValueError(
                "kmeans_baseline: n_clusters must be an int when groups is not given, "
                f"got {type(n_clusters).__name__}."
            )
        return _kmeans(features, int(n_clusters), seed)

    groups = _as_labels(groups, "groups")
    _check_same_length(features=features, groups=groups)
    labels = np.empty(len(features), dtype=np.int64)
    next_label = 0
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        if isinstance(n_clusters, Mapping):
            if _scalar(group) not in n_clusters:
                raise KeyError(f"kmeans_baseline: n_clusters has no entry for group {_scalar(group)!r}.")
            count = int(n_clusters[_scalar(group)])
        else:
            count = int(n_clusters)
        count = min(count, len(members))
        labels[members] = _kmeans(features[members], count, seed) + next_label
        next_label += count
    return labels


def _kmeans(features: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    if n_clusters < 1:
        raise ValueError(f"kmeans_baseline: cluster count must be at least 1, got {n_clusters}.")
    if n_clusters > len(features):
        raise ValueError(
            f"kmeans_baseline: {n_clusters} clusters requested for {len(features)} rows. "
            "Lower n_clusters."
        )
    model = KMeans(n_clusters=n_clusters, random_state=seed, n_init=10)
    return model.fit_predict(features).astype(np.int64)
