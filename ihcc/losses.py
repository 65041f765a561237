"""Contrastive clustering losses and the participant loss, on global float32 arrays.

Every function takes the whole global batch and uses no axis names, so it runs unchanged
under `jax.jit` with the batch sharded over a device mesh (XLA inserts the collectives).
All functions are pure `jax.numpy`, use masks and `jnp.where` instead of boolean indexing,
and give finite values and gradients for finite inputs. docs/method.md writes out the math.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Lower bound on a vector norm in the cosine similarity, the default of
# torch.nn.CosineSimilarity, which the reference cluster loss uses.
COSINE_EPS = 1e-8

PARTICIPANT_LOSS_FORMS = ("cross_entropy", "reference")


def _check_pair(name_i: str, a, name_j: str, b) -> None:
    if a.ndim != 2:
        raise ValueError(f"{name_i} must be a 2-D array [batch, dim], got shape {a.shape}.")
    if a.shape != b.shape:
        raise ValueError(
            f"{name_i} and {name_j} must have the same shape, got {a.shape} and {b.shape}; "
            "pass the two augmented views of the same batch."
        )


def _nt_xent(similarity: jax.Array) -> jax.Array:
    """Return the NT-Xent loss for a [2N, 2N] matrix of scaled similarities.

    Rows 0..N-1 are the first view and rows N..2N-1 the second view of the same N items.
    Each row is one anchor: its positive is the other view of the same item and its
    negatives are the remaining 2N - 2 rows. The loss is the cross-entropy of picking the
    positive, summed over the 2N anchors and divided by 2N.
    """
    two_n = similarity.shape[0]
    n = two_n // 2
    index = jnp.arange(two_n)
    positive_index = (index + n) % two_n

    # The self-similarity is excluded from the softmax: a -inf logit contributes exp(-inf) = 0
    # to the sum and, because jnp.where routes no gradient to the unselected branch, nothing
    # to the gradient.
    is_self = index[:, None] == index[None, :]
    logits = jnp.where(is_self, -jnp.inf, similarity)
    log_normaliser = jax.nn.logsumexp(logits, axis=1)
    positive = jnp.take_along_axis(similarity, positive_index[:, None], axis=1)[:, 0]
    return jnp.mean(log_normaliser - positive)


def instance_loss(z_i: jax.Array, z_j: jax.Array, temperature) -> jax.Array:
    """Compute the instance-level NT-Xent loss of two views of a batch.

    `z_i` and `z_j` are [B, D] embeddings that the model has already L2-normalised. The
    similarity is the plain dot product divided by `temperature`. The reference does not
    renormalise inside the loss either, so the gradients match it. The loss
    averages over all 2B anchors, and each anchor has the other 2B - 2 embeddings as
    negatives.
    """
    _check_pair("z_i", z_i, "z_j", z_j)
    z = jnp.concatenate([z_i, z_j], axis=0).astype(jnp.float32)
    similarity = (z @ z.T) / temperature
    return _nt_xent(similarity)


def _cosine_similarity_matrix(rows: jax.Array) -> jax.Array:
    squared_norm = jnp.sum(rows * rows, axis=1, keepdims=True)
    # Clamping the squared norm before the square root keeps the gradient finite for an
    # all-zero row, where the norm itself has an infinite derivative.
    norm = jnp.sqrt(jnp.maximum(squared_norm, COSINE_EPS**2))
    unit_rows = rows / norm
    return unit_rows @ unit_rows.T


def _negative_entropy_gap(probs: jax.Array) -> jax.Array:
    """Return log K + sum_k p_k log p_k for p, the normalised column sums of `probs`.

    The value is log K minus the entropy of the mean assignment: 0 when clusters are used
    evenly and log K when one cluster takes everything.
    """
    num_clusters = probs.shape[1]
    column_sums = jnp.sum(probs, axis=0)
    p = column_sums / jnp.sum(column_sums)
    # Empty clusters contribute 0 (the limit of p log p). The inner jnp.where keeps log
    # away from 0, so neither branch produces an infinite value or gradient.
    positive = p > 0
    p_log_p = jnp.where(positive, p * jnp.log(jnp.where(positive, p, 1.0)), 0.0)
    return jnp.log(float(num_clusters)) + jnp.sum(p_log_p)


def cluster_loss(c_i: jax.Array, c_j: jax.Array, temperature) -> tuple[jax.Array, jax.Array]:
    """Compute the cluster-level contrastive loss and the entropy term of two views.

    `c_i` and `c_j` are [B, K] soft cluster assignments (rows on the simplex). Each of the
    2K columns is an anchor: its positive is the same cluster's column in the other view,
    and the similarity is the cosine similarity divided by `temperature`.

    Returns `(contrastive, entropy_term)`, where `entropy_term` is, summed over the two
    views, log K + sum_k p_k log p_k of the view's mean assignment p. The reference
    training loss is `contrastive + entropy_term`.
    """
    _check_pair("c_i", c_i, "c_j", c_j)
    c_i = c_i.astype(jnp.float32)
    c_j = c_j.astype(jnp.float32)

    entropy_term = _negative_entropy_gap(c_i) + _negative_entropy_gap(c_j)

    columns = jnp.concatenate([c_i.T, c_j.T], axis=0)
    similarity = _cosine_similarity_matrix(columns) / temperature
    contrastive = _nt_xent(similarity)
    return contrastive, entropy_term


def cluster_loss_from_logits(
    logits_i: jax.Array, logits_j: jax.Array, temperature
) -> tuple[jax.Array, jax.Array]:
    """Compute `cluster_loss` on the softmax of [B, K] cluster logits.

    The softmax is computed here in float32 with max subtraction, so callers that keep a
    bfloat16 head still get float32 assignments.
    """
    _check_pair("logits_i", logits_i, "logits_j", logits_j)
    c_i = jax.nn.softmax(logits_i.astype(jnp.float32), axis=1)
    c_j = jax.nn.softmax(logits_j.astype(jnp.float32), axis=1)
    return cluster_loss(c_i, c_j, temperature)


def participant_loss(logits: jax.Array, labels: jax.Array, form: str = "cross_entropy") -> jax.Array:
    """Compute the participant-classification loss of one view.

    `logits` is [B, P] and `labels` contains integer participant indices in [0, P).

    form="cross_entropy" (the default) is the mean negative log-softmax of the true
    participant. form="reference" reproduces the published code, which applies NLLLoss to
    softmax probabilities: the loss is minus the mean softmax probability of the true
    participant, whose gradient vanishes when the prediction is confidently wrong.

    A label outside [0, P) makes the loss NaN so that the error cannot pass silently,
    because the values of `labels` cannot raise inside `jax.jit`.
    """
    if form not in PARTICIPANT_LOSS_FORMS:
        raise ValueError(
            f"participant loss form {form!r} is not supported; use one of {PARTICIPANT_LOSS_FORMS}."
        )
    if logits.ndim != 2:
        raise ValueError(f"logits must be a 2-D array [batch, participants], got shape {logits.shape}.")
    if labels.shape != logits.shape[:1]:
        raise ValueError(
            f"labels must have shape {logits.shape[:1]} to match logits {logits.shape}, got {labels.shape}."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer participant indices, got dtype {labels.dtype}.")

    num_participants = logits.shape[1]
    valid = (labels >= 0) & (labels < num_participants)
    safe_labels = jnp.where(valid, labels, 0)[:, None]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=1)
    true_log_prob = jnp.take_along_axis(log_probs, safe_labels, axis=1)[:, 0]

    if form == "cross_entropy":
        per_example = -true_log_prob
    else:
        per_example = -jnp.exp(true_log_prob)
    per_example = jnp.where(valid, per_example, jnp.nan)
    return jnp.mean(per_example)
