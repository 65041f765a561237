"""Tests for ihcc.losses: reference fixtures, hand-checked values and edge cases."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ihcc import losses, parallel

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "reference_losses.npz"

# Loss values must match the reference to this relative error.
LOSS_RTOL = 1e-5


def _load_cases(prefix):
    if not FIXTURES.exists():
        return []
    with np.load(FIXTURES) as data:
        names = sorted({key.split("/")[0] for key in data.files if key.startswith(prefix)})
    return names


@pytest.fixture(scope="module")
def reference():
    if not FIXTURES.exists():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    with np.load(FIXTURES) as data:
        return {key: data[key] for key in data.files}


def _assert_gradient_close(actual, expected):
    actual = np.asarray(actual)
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("case", _load_cases("instance_") or ["missing"])
def test_instance_loss_matches_reference(reference, case):
    z_i = reference[f"{case}/z_i"]
    z_j = reference[f"{case}/z_j"]
    temperature = float(reference[f"{case}/temperature"])

    value, (grad_i, grad_j) = jax.jit(
        jax.value_and_grad(lambda a, b: losses.instance_loss(a, b, temperature), argnums=(0, 1))
    )(z_i, z_j)

    np.testing.assert_allclose(float(value), float(reference[f"{case}/loss"]), rtol=LOSS_RTOL)
    _assert_gradient_close(grad_i, reference[f"{case}/grad_z_i"])
    _assert_gradient_close(grad_j, reference[f"{case}/grad_z_j"])


@pytest.mark.parametrize("case", _load_cases("cluster_") or ["missing"])
def test_cluster_loss_matches_reference(reference, case):
    c_i = reference[f"{case}/c_i"]
    c_j = reference[f"{case}/c_j"]
    temperature = float(reference[f"{case}/temperature"])

    def reference_total(a, b):
        contrastive, entropy_term = losses.cluster_loss(a, b, temperature)
        return contrastive + entropy_term

    value, (grad_i, grad_j) = jax.jit(jax.value_and_grad(reference_total, argnums=(0, 1)))(c_i, c_j)

    np.testing.assert_allclose(float(value), float(reference[f"{case}/loss"]), rtol=LOSS_RTOL)
    _assert_gradient_close(grad_i, reference[f"{case}/grad_c_i"])
    _assert_gradient_close(grad_j, reference[f"{case}/grad_c_j"])


def test_cluster_reference_loss_includes_entropy(reference):
    case = _load_cases("cluster_")[0]
    contrastive, entropy_term = jax.jit(losses.cluster_loss)(reference[f"{case}/c_i"], reference[f"{case}/c_j"], 1.0)
    expected = float(reference[f"{case}/loss"])

    assert float(entropy_term) > 1e-3
    assert abs(float(contrastive) - expected) > 100 * LOSS_RTOL * abs(expected)
    np.testing.assert_allclose(float(contrastive + entropy_term), expected, rtol=LOSS_RTOL)


@pytest.mark.parametrize("case", _load_cases("participant_") or ["missing"])
def test_participant_reference_form_matches(reference, case):
    logits = reference[f"{case}/logits"]
    labels = jnp.asarray(reference[f"{case}/labels"])

    value, grad = jax.jit(jax.value_and_grad(lambda x: losses.participant_loss(x, labels, form="reference")))(logits)

    np.testing.assert_allclose(float(value), float(reference[f"{case}/loss"]), rtol=LOSS_RTOL)
    _assert_gradient_close(grad, reference[f"{case}/grad_logits"])


def _random_views(seed, batch, dim):
    rng = np.random.default_rng(seed)
    z_i = rng.normal(size=(batch, dim)).astype(np.float32)
    z_j = (z_i + 0.3 * rng.normal(size=(batch, dim))).astype(np.float32)
    z_i /= np.linalg.norm(z_i, axis=1, keepdims=True)
    z_j /= np.linalg.norm(z_j, axis=1, keepdims=True)
    return z_i, z_j


def _numpy_nt_xent(z_i, z_j, temperature):
    """Loop-based NT-Xent written independently of the vectorised implementation."""
    z = np.concatenate([z_i, z_j]).astype(np.float64)
    n = len(z_i)
    total = 0.0
    for anchor in range(2 * n):
        positive = (anchor + n) % (2 * n)
        logits = [z[anchor] @ z[other] / temperature for other in range(2 * n) if other != anchor]
        total += np.log(np.sum(np.exp(logits))) - z[anchor] @ z[positive] / temperature
    return total / (2 * n)


def test_instance_loss_matches_loop():
    z_i, z_j = _random_views(0, batch=6, dim=5)

    value = losses.instance_loss(z_i, z_j, 0.2)

    np.testing.assert_allclose(float(value), _numpy_nt_xent(z_i, z_j, 0.2), rtol=1e-5)


def test_instance_loss_single_pair_is_zero():
    z_i, z_j = _random_views(1, batch=1, dim=4)

    value = losses.instance_loss(z_i, z_j, 0.5)

    assert float(value) == pytest.approx(0.0, abs=1e-6)


def test_instance_loss_rejects_mismatched_views():
    with pytest.raises(ValueError, match="same shape"):
        losses.instance_loss(jnp.zeros((4, 8)), jnp.zeros((3, 8)), 0.5)


def test_entropy_term_uniform_and_collapsed():
    batch, clusters = 8, 5
    uniform = jnp.full((batch, clusters), 1.0 / clusters)
    collapsed = jnp.zeros((batch, clusters)).at[:, 2].set(1.0)

    _, uniform_term = losses.cluster_loss(uniform, uniform, 1.0)
    _, collapsed_term = losses.cluster_loss(collapsed, collapsed, 1.0)

    assert float(uniform_term) == pytest.approx(0.0, abs=1e-6)
    assert float(collapsed_term) == pytest.approx(2 * np.log(clusters), rel=1e-6)


def test_cluster_loss_zero_column_finite_gradient():
    rng = np.random.default_rng(2)
    c_i = rng.dirichlet(np.ones(6), size=4).astype(np.float32)
    c_i[:, 3] = 0.0
    c_i /= c_i.sum(axis=1, keepdims=True)
    c_j = np.roll(c_i, 1, axis=0)

    def total(a, b):
        contrastive, entropy_term = losses.cluster_loss(a, b, 0.5)
        return contrastive + entropy_term

    value, (grad_i, grad_j) = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(c_i, c_j)

    assert np.isfinite(float(value))
    assert np.all(np.isfinite(grad_i))
    assert np.all(np.isfinite(grad_j))


def test_cluster_loss_from_logits_matches_probs():
    rng = np.random.default_rng(3)
    logits_i = rng.normal(size=(5, 4)).astype(np.float32)
    logits_j = rng.normal(size=(5, 4)).astype(np.float32)

    from_logits = losses.cluster_loss_from_logits(logits_i, logits_j, 1.0)
    from_probs = losses.cluster_loss(jax.nn.softmax(logits_i), jax.nn.softmax(logits_j), 1.0)

    np.testing.assert_allclose(np.array(from_logits), np.array(from_probs), rtol=1e-6)


def test_participant_cross_entropy_matches_optax():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(7, 3)).astype(np.float32) * 3
    labels = jnp.asarray(rng.integers(0, 3, size=7))

    value = losses.participant_loss(logits, labels)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    np.testing.assert_allclose(float(value), float(expected), rtol=1e-6)


def test_participant_loss_out_of_range_label_is_nan():
    logits = jnp.zeros((3, 4))

    too_large = losses.participant_loss(logits, jnp.array([0, 1, 4]))
    negative = losses.participant_loss(logits, jnp.array([0, -1, 2]), form="reference")

    assert np.isnan(float(too_large))
    assert np.isnan(float(negative))


def test_participant_loss_rejects_bad_arguments():
    logits = jnp.zeros((3, 4))

    with pytest.raises(ValueError, match="form 'nll'"):
        losses.participant_loss(logits, jnp.array([0, 1, 2]), form="nll")
    with pytest.raises(ValueError, match="integer"):
        losses.participant_loss(logits, jnp.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="shape"):
        losses.participant_loss(logits, jnp.array([0, 1]))


def test_losses_sharded_batch_match_single_device():
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("needs several devices; tests/conftest.py sets four fake CPU devices")
    mesh = parallel.make_mesh()
    batch_sharding = parallel.batch_sharded(mesh)
    batch = 2 * len(devices)
    z_i, z_j = _random_views(5, batch=batch, dim=8)
    rng = np.random.default_rng(6)
    logits_i = rng.normal(size=(batch, 5)).astype(np.float32)
    logits_j = rng.normal(size=(batch, 5)).astype(np.float32)
    labels = rng.integers(0, 3, size=batch)

    def all_losses(z_i, z_j, logits_i, logits_j, labels):
        contrastive, entropy_term = losses.cluster_loss_from_logits(logits_i, logits_j, 1.0)
        return jnp.stack(
            [
                losses.instance_loss(z_i, z_j, 0.5),
                contrastive,
                entropy_term,
                losses.participant_loss(logits_i[:, :3], labels),
            ]
        )

    arrays = (z_i, z_j, logits_i, logits_j, labels)
    sharded = [jax.device_put(array, batch_sharding) for array in arrays]
    on_mesh = jax.jit(all_losses)(*sharded)
    single = all_losses(*arrays)

    np.testing.assert_allclose(np.array(on_mesh), np.array(single), rtol=1e-5)
    assert on_mesh.dtype == jnp.float32
