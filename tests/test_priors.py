"""Tests for ihcc.priors: reference fixtures, GEM density checks and finiteness properties."""

import itertools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from ihcc import priors

FIXTURES = (
    Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "reference_losses.npz"
)


def _stick_breaking_cases():
    if not FIXTURES.exists():
        return ["missing"]
    with np.load(FIXTURES) as data:
        return sorted({key.split("/")[0] for key in data.files if key.startswith("stickbreak_")})


@pytest.fixture(scope="module")
def reference():
    if not FIXTURES.exists():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    with np.load(FIXTURES) as data:
        return {key: data[key] for key in data.files}


reference_value_and_grad = jax.jit(jax.value_and_grad(priors.reference_stick_breaking))
gem_value_and_grad = jax.jit(jax.value_and_grad(priors.gem_log_prior), static_argnames=("sort",))
dp_value_and_grad = jax.jit(jax.value_and_grad(priors.dp_log_partition))


@pytest.mark.parametrize("case", _stick_breaking_cases())
def test_reference_stick_breaking_matches_fixture(reference, case):
    pi = reference[f"{case}/pi"]
    alpha = reference[f"{case}/alpha"]
    expected_grad = reference[f"{case}/grad_pi"]

    value, grad = reference_value_and_grad(pi, alpha)
    grad = np.asarray(grad)
    finite = np.isfinite(expected_grad)

    np.testing.assert_allclose(float(value), float(reference[f"{case}/loss"]), rtol=1e-5)
    assert np.all(np.isfinite(grad))
    scale = np.max(np.abs(expected_grad[finite]))
    np.testing.assert_allclose(grad[finite], expected_grad[finite], rtol=1e-4, atol=1e-6 * scale)


def test_reference_nan_case_has_masked_sticks(reference):
    case = "stickbreak_b8_k150_a15.0"
    if f"{case}/pi" not in reference:
        pytest.skip(f"fixture case {case} not present")

    # The reference gradient is NaN exactly where a remaining stick length is 0 in float32,
    # so the case exercises the masked branch that must stay finite here.
    assert np.isnan(reference[f"{case}/grad_pi"]).any()
    _, grad = reference_value_and_grad(reference[f"{case}/pi"], reference[f"{case}/alpha"])
    assert np.all(np.isfinite(np.asarray(grad)))


def test_reference_stick_breaking_hand_value():
    # Two images, K = 3: sticks beta_0 = pi_0 and beta_1 = pi_1 / (1 - pi_0).
    pi = np.array([[0.5, 0.25, 0.25], [0.2, 0.4, 0.4]], np.float32)
    alpha = 3.0
    betas = np.array([0.5, 0.5, 0.2, 0.5])
    expected = np.mean(stats.beta.logpdf(betas, 1.0, alpha))

    value = priors.reference_stick_breaking(pi, alpha)

    assert float(value) == pytest.approx(expected, rel=1e-6)


def test_reference_stick_breaking_alpha_one_is_zero():
    pi = np.full((2, 4), 0.25, np.float32)

    value, grad = reference_value_and_grad(pi, 1.0)

    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def test_gem_two_clusters_is_beta_density():
    weights = np.array([0.3, 0.7], np.float32)
    smoothing = 1e-6
    smoothed_first = (1 - smoothing) * 0.3 + smoothing / 2

    value = priors.gem_log_prior(weights, 4.0, smoothing=smoothing, sort=False)

    assert float(value) == pytest.approx(stats.beta.logpdf(smoothed_first, 1.0, 4.0), rel=1e-5)


def test_gem_matches_change_of_variables():
    # Independent check: log p(w) = sum_k log Beta(v_k; 1, alpha) - log |det dw/dv|, with the
    # Jacobian of the map from K - 1 sticks to the first K - 1 weights taken by autodiff.
    alpha = 2.5
    sticks = jnp.array([0.3, 0.6, 0.2, 0.5], jnp.float32)

    def weights_from_sticks(v):
        remaining = jnp.concatenate([jnp.ones(1), jnp.cumprod(1.0 - v)])
        return jnp.concatenate([v, jnp.ones(1)]) * remaining

    jacobian = jax.jacobian(lambda v: weights_from_sticks(v)[:-1])(sticks)
    _, log_det = np.linalg.slogdet(np.asarray(jacobian, np.float64))
    expected = np.sum(stats.beta.logpdf(np.asarray(sticks, np.float64), 1.0, alpha)) - log_det

    value = priors.gem_log_prior(weights_from_sticks(sticks), alpha, smoothing=1e-7, sort=False)

    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_gem_sorted_ignores_cluster_labels():
    weights = np.array([0.05, 0.6, 0.1, 0.25], np.float32)
    permuted = weights[[2, 0, 3, 1]]

    value = priors.gem_log_prior(weights, 0.7)
    permuted_value = priors.gem_log_prior(permuted, 0.7)
    index_order_value = priors.gem_log_prior(weights, 0.7, sort=False)

    assert float(permuted_value) == pytest.approx(float(value), rel=1e-6)
    assert float(value) > float(index_order_value)


def _concentrated_and_spread(num_clusters, occupied):
    concentrated = np.full(num_clusters, 1e-3, np.float32)
    concentrated[:occupied] = (1.0 - 1e-3 * (num_clusters - occupied)) / occupied
    spread = np.full(num_clusters, 1.0 / num_clusters, np.float32)
    return concentrated, spread


def test_gem_small_alpha_prefers_few_clusters():
    concentrated, spread = _concentrated_and_spread(num_clusters=10, occupied=3)

    margin_small = priors.gem_log_prior(concentrated, 0.5) - priors.gem_log_prior(spread, 0.5)
    margin_large = priors.gem_log_prior(concentrated, 50.0) - priors.gem_log_prior(spread, 50.0)

    assert float(margin_small) > 0.0
    assert float(margin_large) < 0.0


def test_gem_margin_decreases_with_alpha():
    concentrated, spread = _concentrated_and_spread(num_clusters=10, occupied=3)
    alphas = [0.1, 0.5, 1.0, 5.0, 20.0, 50.0]

    margins = [
        float(priors.gem_log_prior(concentrated, a) - priors.gem_log_prior(spread, a))
        for a in alphas
    ]

    assert all(later < earlier for earlier, later in zip(margins, margins[1:]))


def test_gem_rejects_bad_arguments():
    with pytest.raises(ValueError, match="K >= 2"):
        priors.gem_log_prior(jnp.ones(1), 1.0)
    with pytest.raises(ValueError, match="1-D"):
        priors.gem_log_prior(jnp.ones((2, 3)) / 3, 1.0)
    with pytest.raises(ValueError, match="smoothing"):
        priors.gem_log_prior(jnp.ones(3) / 3, 1.0, smoothing=0.0)


@pytest.mark.parametrize("alpha", [0.5, 5.0])
def test_sampled_gem_occupancy_matches_dp(alpha):
    # Draw N items from each sampled GEM weight vector and count distinct clusters: the
    # mean count must match the Dirichlet-process expectation sum_i alpha / (alpha + i).
    # Truncating at 100 sticks leaves an expected tail mass of (alpha / (1 + alpha))^99, at
    # most 2e-8 for these alphas.
    num_draws, replicates, num_clusters = 400, 300, 100
    weights = np.asarray(
        priors.sample_gem(jax.random.PRNGKey(7), alpha, num_clusters, replicates), np.float64
    )
    rng = np.random.default_rng(8)
    occupied = np.array(
        [
            len(np.unique(rng.choice(num_clusters, size=num_draws, p=row / row.sum())))
            for row in weights
        ],
        np.float64,
    )

    expected = priors.expected_occupied_clusters(alpha, num_draws)
    standard_error = occupied.std(ddof=1) / np.sqrt(replicates)

    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)
    assert abs(occupied.mean() - expected) < 4 * standard_error + 0.02 * expected


def _dirichlet_multinomial_partitions(alpha, num_clusters, num_items):
    """Enumerate every labelling of num_items items; return (probability, occupied) pairs."""
    out = []
    for labels in itertools.product(range(num_clusters), repeat=num_items):
        counts = np.bincount(labels, minlength=num_clusters)
        weights = jnp.asarray(counts / num_items, jnp.float32)
        log_p = float(priors.dp_log_partition(weights, alpha, num_items)) * num_items
        out.append((np.exp(log_p), int(np.count_nonzero(counts))))
    return out


@pytest.mark.parametrize("alpha", [0.3, 1.0, 5.0])
def test_dp_partition_exact_on_enumeration(alpha):
    num_clusters, num_items = 4, 5
    share = alpha / num_clusters

    table = _dirichlet_multinomial_partitions(alpha, num_clusters, num_items)
    total = sum(p for p, _ in table)
    occupied = sum(p * k for p, k in table)

    # Under a symmetric Dirichlet(alpha / K) prior a given cluster stays empty with
    # probability G(alpha) G(alpha - a + N) / (G(alpha - a) G(alpha + N)).
    log_empty = (
        math.lgamma(alpha)
        + math.lgamma(alpha - share + num_items)
        - math.lgamma(alpha - share)
        - math.lgamma(alpha + num_items)
    )
    assert total == pytest.approx(1.0, abs=1e-5)
    assert occupied == pytest.approx(num_clusters * (1.0 - math.exp(log_empty)), rel=1e-5)


def test_dp_partition_large_k_limit():
    # For K much larger than the number of occupied clusters the finite form approaches
    # alpha^K+ G(alpha) / G(alpha + N) prod_k G(n_k).
    alpha, num_items = 2.0, 40
    counts = np.array([20, 12, 8] + [0] * 9997, np.float32)
    crp = (
        3 * math.log(alpha)
        + math.lgamma(alpha)
        - math.lgamma(alpha + num_items)
        + sum(math.lgamma(n) for n in (20, 12, 8))
    ) / num_items

    value = priors.dp_log_partition(jnp.asarray(counts / num_items), alpha, num_items)

    # Each occupied cluster carries an extra log(1 / K) in the finite form.
    assert float(value) == pytest.approx(crp - 3 * math.log(counts.size) / num_items, rel=1e-4)


def test_dp_partition_cluster_cost_alpha():
    # Splitting 10 items off a cluster of 40 adds one occupied cluster, which costs about
    # log(K / alpha). So a tenfold alpha raises the log-probability gain of the split by
    # about log 10.
    def split_gain(alpha):
        one = jnp.zeros(5000).at[0].set(1.0)
        two = jnp.zeros(5000).at[0].set(0.75).at[1].set(0.25)
        return (
            float(priors.dp_log_partition(two, alpha, 40) - priors.dp_log_partition(one, alpha, 40))
            * 40
        )

    assert split_gain(0.1) < split_gain(1.0)
    assert split_gain(1.0) < split_gain(10.0)
    assert split_gain(10.0) - split_gain(1.0) == pytest.approx(math.log(10.0), rel=0.02)


def test_dp_partition_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_items"):
        priors.dp_log_partition(jnp.full((3,), 1.0 / 3), 1.0, 0)
    with pytest.raises(ValueError, match="1-D"):
        priors.dp_log_partition(jnp.full((2, 3), 1.0 / 3), 1.0, 10)


def test_expected_occupied_clusters_asymptotics():
    # The exact DP expectation approaches alpha * log(1 + n / alpha) for alpha >= 1.
    assert priors.expected_occupied_clusters(1.0, 1) == 1.0
    assert priors.expected_occupied_clusters(5.0, 400) == pytest.approx(
        5.0 * np.log(1 + 400 / 5.0), rel=0.05
    )
    assert priors.expected_occupied_clusters(0.5, 400) > priors.expected_occupied_clusters(0.1, 400)


def test_mixture_weights_gradient_through_batch_only():
    batch_probs = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], jnp.float32)
    ema = jnp.array([0.2, 0.3, 0.5], jnp.float32)
    target = jnp.array([1.0, 2.0, 3.0], jnp.float32)

    def objective(probs, ema):
        weights, _ = priors.mixture_weights(probs, ema, 0.75)
        return jnp.dot(weights, target)

    weights, new_ema = priors.mixture_weights(batch_probs, ema, 0.75)
    grad_probs, grad_ema = jax.grad(objective, argnums=(0, 1))(batch_probs, ema)

    np.testing.assert_allclose(weights, 0.75 * ema + 0.25 * batch_probs.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(new_ema, weights, rtol=0)
    np.testing.assert_allclose(grad_probs, np.tile(0.25 * target / 2, (2, 1)), rtol=1e-6)
    np.testing.assert_array_equal(grad_ema, np.zeros(3))


def test_mixture_weights_full_gradient_keeps_the_running_value():
    batch_probs = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], jnp.float32)
    ema = jnp.array([0.2, 0.3, 0.5], jnp.float32)
    target = jnp.array([1.0, 2.0, 3.0], jnp.float32)

    def objective(probs):
        weights, _ = priors.mixture_weights(probs, ema, 0.75, full_gradient=True)
        return jnp.dot(weights, target)

    weights, new_ema = priors.mixture_weights(batch_probs, ema, 0.75, full_gradient=True)

    np.testing.assert_allclose(weights, 0.75 * ema + 0.25 * batch_probs.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(new_ema, weights, rtol=1e-6)
    np.testing.assert_allclose(
        jax.grad(objective)(batch_probs), np.tile(target / 2, (2, 1)), rtol=1e-6
    )


def test_mixture_weights_zero_momentum_is_batch_mean():
    batch_probs = jnp.array([[0.5, 0.5], [0.9, 0.1]], jnp.float32)

    weights, _ = priors.mixture_weights(batch_probs, priors.initial_mixture_weights(2), 0.0)

    np.testing.assert_allclose(weights, [0.7, 0.3], rtol=1e-6)


def test_mixture_weights_rejects_bad_arguments():
    probs = jnp.full((4, 3), 1.0 / 3)

    with pytest.raises(ValueError, match="momentum"):
        priors.mixture_weights(probs, priors.initial_mixture_weights(3), 1.0)
    with pytest.raises(ValueError, match="initial_mixture_weights"):
        priors.mixture_weights(probs, priors.initial_mixture_weights(4), 0.5)


# Property-based finiteness checks. Few distinct shapes keep the number of compilations small.
CLUSTER_COUNTS = st.sampled_from([2, 7, 200])
ALPHAS = st.floats(min_value=0.1, max_value=50.0)
KINDS = st.sampled_from(["simplex", "peaked", "one_hot", "zero_columns"])


def _assignments(kind, batch, num_clusters, seed):
    rng = np.random.default_rng(seed)
    if kind == "simplex":
        probs = rng.dirichlet(np.ones(num_clusters), size=batch)
    elif kind == "peaked":
        # Concentration 0.01 gives weights down to 1e-30 and below, and rows close to one-hot.
        probs = rng.dirichlet(np.full(num_clusters, 0.01), size=batch)
    elif kind == "one_hot":
        probs = np.eye(num_clusters)[rng.integers(0, num_clusters, size=batch)]
    else:
        probs = rng.dirichlet(np.ones(num_clusters), size=batch)
        probs[:, rng.random(num_clusters) < 0.5] = 0.0
        probs[:, 0] += 1.0 - probs.sum(axis=1)
    return probs.astype(np.float32)


@settings(max_examples=50, deadline=None)
@given(
    num_clusters=CLUSTER_COUNTS,
    alpha=ALPHAS,
    kind=KINDS,
    seed=st.integers(0, 2**31 - 1),
)
def test_reference_stick_breaking_always_finite(num_clusters, alpha, kind, seed):
    pi = _assignments(kind, 3, num_clusters, seed)

    value, grad = reference_value_and_grad(pi, np.float32(alpha))

    assert np.isfinite(float(value))
    assert np.all(np.isfinite(np.asarray(grad)))


@settings(max_examples=50, deadline=None)
@given(
    num_clusters=CLUSTER_COUNTS,
    alpha=ALPHAS,
    kind=KINDS,
    sort=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_gem_log_prior_always_finite(num_clusters, alpha, kind, sort, seed):
    weights = _assignments(kind, 1, num_clusters, seed)[0]

    value, grad = gem_value_and_grad(weights, np.float32(alpha), sort=sort)

    assert np.isfinite(float(value))
    assert np.all(np.isfinite(np.asarray(grad)))


@settings(max_examples=50, deadline=None)
@given(
    num_clusters=CLUSTER_COUNTS,
    alpha=ALPHAS,
    kind=KINDS,
    num_items=st.sampled_from([1, 64, 100000]),
    seed=st.integers(0, 2**31 - 1),
)
def test_dp_log_partition_always_finite(num_clusters, alpha, kind, num_items, seed):
    weights = _assignments(kind, 1, num_clusters, seed)[0]

    value, grad = dp_value_and_grad(weights, np.float32(alpha), np.float32(num_items))

    assert np.isfinite(float(value))
    assert np.all(np.isfinite(np.asarray(grad)))


def test_vmf_likelihood_rewards_splitting_only_distinct_directions():
    east = np.array([1.0, 0.0], np.float32)
    north = np.array([0.0, 1.0], np.float32)
    # Four items, two pointing east and two north, as (1/N) sum_i c_ik z_i for K = 2.
    one_cluster = np.stack([(2 * east + 2 * north) / 4, np.zeros(2, np.float32)])
    split_by_direction = np.stack([2 * east / 4, 2 * north / 4])
    split_each_direction_in_half = np.stack([(east + north) / 4, (east + north) / 4])

    def value(sums):
        return float(priors.vmf_log_likelihood(jnp.asarray(sums), 3.0))

    assert value(one_cluster) == pytest.approx(3.0 * np.sqrt(2.0) / 2, rel=1e-6)
    assert value(split_by_direction) == pytest.approx(3.0, rel=1e-6)
    assert value(split_each_direction_in_half) == pytest.approx(value(one_cluster), rel=1e-6)
    grad = jax.grad(lambda s: priors.vmf_log_likelihood(s, 3.0))(jnp.zeros((3, 2)))
    assert np.all(np.isfinite(np.asarray(grad)))
