"""Stick-breaking priors on cluster probabilities and the mixture-weight estimate they use.

Three priors live here:

- `reference_stick_breaking` reproduces the per-image term of the published IH-CC code,
  faults included, except that its gradient is finite everywhere.
- `gem_log_prior` is the log-density of a truncated GEM(alpha) stick-breaking prior at the
  mixture weights, with the change-of-variables term, evaluated in log space.
- `dp_log_partition` is the probability of the data's partition into clusters when the
  GEM weights are integrated out: the Dirichlet-process partition probability, in its
  finite-K form, at soft cluster counts. Each occupied cluster costs about log(K / alpha).

`mixture_weights` estimates the mixture weights from the global batch and an exponential
moving average. Every function works on global arrays without axis names, so it runs
under `jax.jit` with the batch sharded over a device mesh. docs/method.md derives the
formulas and discusses the faults of the reference term.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# The reference clips each stick proportion at this value before taking log(1 - beta).
REFERENCE_BETA_MAX = 0.9999999

# Share of uniform mass mixed into the weights before `gem_log_prior` takes logs: the
# smallest smoothed weight is DEFAULT_SMOOTHING / K, which bounds the value and the
# gradient for one-hot weights and empty clusters.
DEFAULT_SMOOTHING = 1e-3


def _two_sum_add(left, right):
    """Add two float-float numbers (high, low) and renormalise the result.

    The high part of the result is the float32 rounding of the pair's value and the low
    part is the rounding error, so a chain of these additions keeps about twice the
    float32 precision.
    """
    left_high, left_low = left
    right_high, right_low = right
    total = left_high + right_high
    right_part = total - left_high
    error = (left_high - (total - right_part)) + (right_high - right_part)
    low = error + left_low + right_low
    high = total + low
    return high, low - (high - total)


def _cumsum_with_wide_accumulator(x: jax.Array, axis: int) -> jax.Array:
    """Return the cumulative sum of float32 `x` with each output rounded once to float32.

    PyTorch's CPU cumsum accumulates float32 inputs in float64 and rounds every output to
    float32. The remaining stick length 1 - cumsum cancels catastrophically, and whether it
    reaches exactly 0 decides which sticks the reference masks out, so a plain float32
    cumsum does not reproduce the reference (0.13 relative error on a peaked K=150 batch).
    A float-float scan matches it without enabling float64 in JAX.
    """
    high, _ = jax.lax.associative_scan(_two_sum_add, (x, jnp.zeros_like(x)), axis=axis)
    return high


def reference_stick_breaking(pi: jax.Array, alpha) -> jax.Array:
    """Compute the stick-breaking term of the published IH-CC code for assignments `pi` [B, K].

    The published code is github.com/engelhard-lab/ih-cc-environtyping,
    `Network.stickbreak` in modules/network_stick.py.

    For each image and each of the K - 1 sticks k < K - 1 (0-based),
    beta_k = pi_k / (1 - sum_{j<k} pi_j). Sticks whose remaining length is <= 0 are masked
    out and beta is clipped at REFERENCE_BETA_MAX. The result is the mean of
    log Beta(beta_k; 1, alpha) over the unmasked entries of the batch whose log-density is
    non-zero. The reference training loss subtracts lambda times this value.

    Unlike the reference, the gradient is finite everywhere: the division uses a safe
    denominator on masked sticks, where the reference divides 0 by 0 in the backward pass.
    Where no entry survives the mask (alpha = 1 makes every log-density 0), the result is 0
    instead of the reference's NaN.
    """
    if pi.ndim != 2 or pi.shape[1] < 2:
        raise ValueError(
            f"pi must be a 2-D array [batch, clusters] with at least 2 clusters, got shape {pi.shape}."
        )
    pi = pi.astype(jnp.float32)
    alpha = jnp.asarray(alpha, jnp.float32)
    num_sticks = pi.shape[1] - 1

    cumulative = _cumsum_with_wide_accumulator(pi, axis=1)
    mass_before = jnp.concatenate(
        [jnp.zeros_like(pi[:, :1]), cumulative[:, : num_sticks - 1]], axis=1
    )
    remaining = 1.0 - mass_before
    masked = remaining <= 0.0

    # Double where: the masked branch divides by 1 instead of by 0 or a negative length,
    # so its derivative is finite, and the outer where then sends it no gradient.
    safe_remaining = jnp.where(masked, 1.0, remaining)
    beta = jnp.where(masked, 0.0, pi[:, :num_sticks] / safe_remaining)
    beta = jnp.where(beta > REFERENCE_BETA_MAX, jnp.float32(REFERENCE_BETA_MAX), beta)

    log_density = jnp.log(alpha) + (alpha - 1.0) * jnp.log1p(-beta)
    included = jnp.logical_not(masked) & (log_density != 0.0)
    count = jnp.sum(included)
    total = jnp.sum(jnp.where(included, log_density, 0.0))
    return total / jnp.maximum(count, 1).astype(jnp.float32)


def _check_weights(weights: jax.Array) -> None:
    if weights.ndim != 1 or weights.shape[0] < 2:
        raise ValueError(
            f"weights must be a 1-D array of K >= 2 mixture weights, got shape {weights.shape}; "
            "average the [batch, K] assignments over the batch first."
        )


def _check_smoothing(smoothing) -> None:
    if isinstance(smoothing, (int, float)) and not 0.0 < smoothing < 1.0:
        raise ValueError(
            f"smoothing must be in (0, 1), got {smoothing}; without a floor, one-hot weights "
            "give an infinite log-density."
        )


def gem_log_prior(
    weights: jax.Array, alpha, *, smoothing=DEFAULT_SMOOTHING, sort: bool = True
) -> jax.Array:
    """Compute the truncated GEM(alpha) log-density of mixture weights `weights` [K].

    With sticks v_k = w_k / r_k and remaining mass r_k = sum_{j>=k} w_j, the density is
    log p(w) = sum_{k<K} log Beta(v_k; 1, alpha) - sum_{k<K} log r_k, the last term being
    log |dv/dw| for the map from the first K - 1 weights to the K - 1 sticks.

    The weights are normalised to sum 1 and mixed with the uniform distribution,
    w' = (1 - smoothing) * w + smoothing / K, so every weight is at least smoothing / K and
    the value and gradient stay finite for one-hot weights and empty clusters. The
    remaining masses are reverse cumulative log-sum-exps of log w', never 1 - cumsum(w).

    With sort=True (the default) the density is evaluated at the weights sorted in
    decreasing order, which makes it invariant to relabelling the clusters. For
    alpha <= 1 that order maximises the density over all orderings. With sort=False the
    clusters are taken in index order.
    """
    _check_weights(weights)
    _check_smoothing(smoothing)
    weights = weights.astype(jnp.float32)
    num_clusters = weights.shape[0]

    total = jnp.sum(weights)
    total = jnp.where(total > 0.0, total, 1.0)
    smoothed = (1.0 - smoothing) * (weights / total) + smoothing / num_clusters
    return _gem_log_density(jnp.log(smoothed), jnp.asarray(alpha, jnp.float32), sort)


def _gem_log_density(log_weights: jax.Array, alpha: jax.Array, sort: bool) -> jax.Array:
    """Return the truncated GEM log-density at weights given as logs that sum to 1."""
    if sort:
        log_weights = jnp.flip(jnp.sort(log_weights))

    # log_remaining[k] = log sum_{j>=k} w_j, so log_remaining[0] is log 1 up to rounding.
    log_remaining = jax.lax.cumlogsumexp(log_weights, axis=0, reverse=True)
    log_one_minus_stick = log_remaining[1:] - log_remaining[:-1]

    num_sticks = log_weights.shape[0] - 1
    log_beta_density = num_sticks * jnp.log(alpha) + (alpha - 1.0) * jnp.sum(log_one_minus_stick)
    log_jacobian = -jnp.sum(log_remaining[:-1])
    return log_beta_density + log_jacobian


def dp_log_partition(
    weights: jax.Array, alpha, num_items, log_empty: jax.Array | None = None
) -> jax.Array:
    """Return the Dirichlet-process partition log-probability per item at soft counts.

    `weights` [K] are mixture weights (normalised here) and `num_items` N is the number of
    items they describe, so the soft cluster counts are n_k = N w_k. With a = alpha / K and
    g(n) = log G(n + a) - log G(a), G being the gamma function,

      log p(n) = log G(alpha) - log G(alpha + N) + sum_k g(n_k):

    the probability of one labelled partition of N items when the weights have a
    symmetric Dirichlet(a, ..., a) prior, the truncation of the GEM(alpha) prior to K
    clusters. As K grows it tends to the Dirichlet-process (Chinese restaurant process)
    probability alpha^K+ G(alpha) / G(alpha + N) prod G(n_k) over the K+ occupied clusters.
    The value returned is log p / N, so that it adds to a loss averaged over items with
    the weight a likelihood per item would have.

    Soft assignments describe a distribution over partitions. Given `log_empty` [K], the
    mean over items of log(1 - c_ik) for assignments c, cluster k is occupied with
    probability q_k = 1 - exp(N log_empty_k) and then holds n_k / q_k items on average;
    sum_k g(n_k) is replaced by sum_k q_k g(max(n_k / q_k, 1)). This charges the cost of a
    cluster, about log(K / alpha), to every cluster that some item might use, so a
    cluster's small probabilities spread over many items cost as much as one item in it.
    For one-hot assignments both forms agree.

    Empty clusters contribute 0. Every gamma function is evaluated at an argument of at
    least a > 0, so the value and the gradient are finite for one-hot weights and empty
    clusters.
    """
    _check_weights(weights)
    if isinstance(num_items, (int, float)) and num_items <= 0:
        raise ValueError(
            f"num_items must be positive, got {num_items}; pass the number of training images."
        )
    if log_empty is not None and log_empty.shape != weights.shape:
        raise ValueError(
            f"log_empty must have the shape of weights {weights.shape}, got {log_empty.shape}."
        )
    weights = jnp.maximum(weights.astype(jnp.float32), 0.0)
    num_clusters = weights.shape[0]
    num_items = jnp.asarray(num_items, jnp.float32)
    alpha = jnp.asarray(alpha, jnp.float32)

    total = jnp.sum(weights)
    total = jnp.where(total > 0.0, total, 1.0)
    counts = num_items * weights / total
    share = alpha / num_clusters

    def cluster_term(n):
        return jax.scipy.special.gammaln(n + share) - jax.scipy.special.gammaln(share)

    if log_empty is None:
        per_cluster = cluster_term(counts)
    else:
        occupied = -jnp.expm1(num_items * jnp.minimum(log_empty.astype(jnp.float32), 0.0))
        safe_occupied = jnp.maximum(occupied, jnp.finfo(jnp.float32).tiny)
        per_cluster = occupied * cluster_term(jnp.maximum(counts / safe_occupied, 1.0))
    log_norm = jax.scipy.special.gammaln(alpha) - jax.scipy.special.gammaln(alpha + num_items)
    return (log_norm + jnp.sum(per_cluster)) / num_items


def log_one_minus(probs: jax.Array) -> jax.Array:
    """Return log(1 - probs) with probabilities capped at 1 - 1e-6, so one-hot rows stay finite."""
    return jnp.log1p(-jnp.minimum(probs.astype(jnp.float32), 1.0 - 1e-6))


def initial_mixture_weights(num_clusters: int) -> jax.Array:
    """Return uniform mixture weights [K], the starting value of the moving average."""
    if num_clusters < 2:
        raise ValueError(f"num_clusters must be at least 2, got {num_clusters}.")
    return jnp.full((num_clusters,), 1.0 / num_clusters, jnp.float32)


def running_mean(
    batch_values: jax.Array, ema: jax.Array, momentum, *, full_gradient: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Average [N, K] `batch_values` over the batch and mix in the moving average `ema` [K].

    Returns `(value, new_ema)` with value = momentum * ema + (1 - momentum) * batch mean.
    The gradient flows through the batch mean only, so it is scaled by (1 - momentum);
    with full_gradient=True it is not scaled: the value is the running estimate and the
    gradient is that of the batch mean. With momentum = 0 the batch alone is used.
    `new_ema` equals the value with the gradient stopped and is the value to carry to the
    next step.
    """
    if batch_values.ndim != 2:
        raise ValueError(
            f"batch values must be a 2-D array [batch, clusters], got shape {batch_values.shape}."
        )
    if ema.shape != batch_values.shape[1:]:
        raise ValueError(
            f"the running mean must have shape {batch_values.shape[1:]} to match the batch "
            f"{batch_values.shape}, got {ema.shape}; start it with initial_mixture_weights(K)."
        )
    if isinstance(momentum, (int, float)) and not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}; 0 uses the batch alone.")

    batch_mean = jnp.mean(batch_values.astype(jnp.float32), axis=0)
    return blend_running_mean(batch_mean, ema, momentum, full_gradient=full_gradient)


def blend_running_mean(
    batch_mean: jax.Array, ema: jax.Array, momentum, *, full_gradient: bool = False
):
    """Mix a batch mean of any shape into its moving average; see `running_mean`."""
    if ema.shape != batch_mean.shape:
        raise ValueError(
            f"the running mean has shape {ema.shape} but the batch mean {batch_mean.shape}; "
            "start the running mean from an array of the batch mean's shape."
        )
    value = (
        momentum * jax.lax.stop_gradient(ema.astype(jnp.float32)) + (1.0 - momentum) * batch_mean
    )
    new_ema = jax.lax.stop_gradient(value)
    if full_gradient:
        value = new_ema + (batch_mean - jax.lax.stop_gradient(batch_mean))
    return value, new_ema


def vmf_log_likelihood(mean_sums: jax.Array, kappa) -> jax.Array:
    """Return the von Mises-Fisher log-likelihood per item of embeddings under soft clusters.

    `mean_sums` [K, D] contains (1/N) sum_i c_ik z_i for unit embeddings z_i and soft
    assignments c. With each cluster's mean direction set to its maximum-likelihood value
    mu_k = S_k / |S_k|, the log-likelihood sum_i sum_k c_ik kappa mu_k . z_i equals
    kappa sum_k |S_k|; divided by N this is kappa sum_k |mean_sums_k|. The vMF normaliser is
    the same for every cluster and is left out. Splitting a cluster raises the value only as
    far as its parts point in different directions.
    """
    squared = jnp.sum(jnp.square(mean_sums.astype(jnp.float32)), axis=-1)
    # The clamp keeps the gradient of the norm finite for a cluster with no mass.
    return kappa * jnp.sum(jnp.sqrt(jnp.maximum(squared, 1e-30)))


def mixture_weights(
    batch_probs: jax.Array, ema_weights: jax.Array, momentum, *, full_gradient: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Estimate the mixture weights from the global batch and a moving average.

    `batch_probs` is [N, K] soft assignments (pass both views stacked to use both), and
    `ema_weights` [K] is the moving average from the previous step. `running_mean`
    describes how they combine and where the gradient flows.
    """
    return running_mean(batch_probs, ema_weights, momentum, full_gradient=full_gradient)


def sample_gem(key: jax.Array, alpha, num_clusters: int, num_samples: int) -> jax.Array:
    """Draw [num_samples, K] weights from the GEM(alpha) prior truncated at K sticks.

    Sticks v_1..v_{K-1} are Beta(1, alpha) and the last cluster takes the remaining mass,
    so each row sums to 1. Computed in log space so that sticks near 1 (small alpha) do
    not lose the tail to cancellation.
    """
    if num_clusters < 2:
        raise ValueError(f"num_clusters must be at least 2, got {num_clusters}.")
    sticks = jax.random.beta(
        key, 1.0, alpha, shape=(num_samples, num_clusters - 1), dtype=jnp.float32
    )
    log_sticks = jnp.log(sticks)
    log_rest = jnp.log1p(-sticks)
    log_remaining = jnp.concatenate(
        [jnp.zeros((num_samples, 1), jnp.float32), jnp.cumsum(log_rest, axis=1)], axis=1
    )
    log_weights = log_remaining + jnp.concatenate(
        [log_sticks, jnp.zeros((num_samples, 1), jnp.float32)], axis=1
    )
    return jnp.exp(log_weights)


def expected_occupied_clusters(alpha: float, num_draws: int) -> float:
    """Return the expected number of distinct clusters among `num_draws` draws from a DP(alpha).

    The exact value is sum_{i<n} alpha / (alpha + i) = alpha * (digamma(alpha + n) - digamma(alpha)),
    close to alpha * log(1 + n / alpha) for alpha >= 1 and n >> alpha; for small alpha the
    approximation is low (3.3 against 4.0 at alpha = 0.5, n = 400).
    """
    return math.fsum(alpha / (alpha + i) for i in range(num_draws))
