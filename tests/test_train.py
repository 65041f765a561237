"""Tests for the train step and loop: data parallelism, resumption, logs."""

import json
import os

import jax
import numpy as np
import pytest

from ihcc import parallel
from ihcc import train

from conftest import tiny_config


class InMemoryImages:
    """Stands in for the decoded-image cache: random uint8 images held in memory."""

    def __init__(self, num_images: int, size: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.data = rng.integers(0, 256, (num_images, size, size, 3), dtype=np.uint8)

    def __len__(self):
        return len(self.data)

    def get_batch(self, indices):
        return self.data[indices]


def make_dataset(config, num_images=16, num_participants=2):
    from ihcc import data

    images = InMemoryImages(num_images, config.data.image_size)
    labels = (np.arange(num_images) % num_participants).astype(np.int32)
    return data.TrainingData(
        images=images,
        participants=[f"p{i}" for i in range(num_participants)],
        participant_labels=labels,
    )


def run_on_mesh(config, mesh, images, labels):
    """Return the gradients, metrics and new batch statistics of one batch."""
    state = train.create_train_state(jax.random.key(0), config, 2, steps_per_epoch=4)
    state = jax.device_put(state, parallel.replicated(mesh))
    replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    grads_fn = jax.jit(
        lambda s, x, y: train.loss_and_grads(
            s, x, y, jax.random.key(3), config, num_images=16, progress=0.5
        )[:4],
        in_shardings=(replicated, sharded, sharded),
        out_shardings=replicated,
    )
    batch = parallel.shard_batch((images, labels), mesh)
    return jax.device_get(grads_fn(state, *batch))


def test_four_devices_match_one_device():
    assert jax.device_count() == 4
    config = tiny_config()
    dataset = make_dataset(config)
    images, labels = dataset.batch(np.arange(config.train.batch_size))

    grads_4, metrics_4, _, stats_4 = run_on_mesh(config, parallel.make_mesh(), images, labels)
    grads_1, metrics_1, _, stats_1 = run_on_mesh(
        config, parallel.make_mesh(jax.devices()[:1]), images, labels
    )

    for key in (
        "loss",
        "instance_loss",
        "cluster_loss",
        "entropy_term",
        "participant_loss",
        "log_prior",
    ):
        np.testing.assert_allclose(metrics_4[key], metrics_1[key], rtol=1e-5, err_msg=key)
    assert np.isfinite(metrics_4["loss"])
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), grads_4, grads_1
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), stats_4, stats_1
    )


def test_step_updates_params_compiles_once():
    config = tiny_config()
    dataset = make_dataset(config)
    images, labels = dataset.batch(np.arange(config.train.batch_size))
    mesh = parallel.make_mesh()
    state = train.create_train_state(jax.random.key(0), config, 2, steps_per_epoch=4)
    before = jax.device_get(state.params)
    state = jax.device_put(state, parallel.replicated(mesh))
    step = train.make_train_step(config, mesh, num_images=16, total_steps=4)
    state, metrics, _ = step(state, *parallel.shard_batch((images, labels), mesh))
    after = jax.device_get(state.params)
    state, _, _ = step(state, *parallel.shard_batch((images, labels), mesh))
    state, _, _ = step(state, *parallel.shard_batch((images, labels), mesh))
    assert step.jitted._cache_size() == 1, "the train step was compiled more than once"

    assert int(state.step) == 3
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after))
    assert all(changed)
    assert 1 <= int(metrics["occupied_in_batch"]) <= config.model.class_num


@pytest.mark.parametrize("prior_kind", ["dp", "gem", "reference", "none"])
def test_loss_terms_finite_for_each_prior(prior_kind):
    config = tiny_config()
    config.prior.kind = prior_kind
    batch, k = 8, config.model.class_num
    rng = np.random.default_rng(0)
    outputs = {
        "z": jax.numpy.asarray(rng.normal(size=(2 * batch, 4)).astype(np.float32)),
        "cluster_logits": jax.numpy.asarray(
            20 * rng.normal(size=(2 * batch, k)).astype(np.float32)
        ),
        "participant_logits": jax.numpy.asarray(rng.normal(size=(2 * batch, 3)).astype(np.float32)),
    }
    outputs["z"] = outputs["z"] / jax.numpy.linalg.norm(outputs["z"], axis=1, keepdims=True)
    labels = jax.numpy.asarray(np.arange(batch) % 3, dtype=np.int32)
    ema = train.initial_cluster_stats(k, 4)

    def loss_of(logits):
        return train.compute_loss_terms(
            {**outputs, "cluster_logits": logits}, labels, ema, config, num_images=100
        )[0]

    loss, grad = jax.value_and_grad(loss_of)(outputs["cluster_logits"])
    assert np.isfinite(float(loss))
    assert np.all(np.isfinite(np.asarray(grad)))
    if prior_kind == "none":
        _, (metrics, _) = train.compute_loss_terms(outputs, labels, ema, config)
        assert float(metrics["log_prior"]) == 0.0
    if prior_kind == "dp":
        with pytest.raises(ValueError, match="num_images"):
            train.compute_loss_terms(outputs, labels, ema, config)


def test_prior_schedule_warms_up_then_ramps():
    config = tiny_config()
    config.loss.entropy_weight = 2.0
    config.prior.warmup_fraction = 0.2
    config.prior.ramp_fraction = 0.4
    config.prior.entropy_scale_end = 0.25

    values = [train.prior_schedule(config, p) for p in (0.0, 0.2, 0.4, 0.6, 1.0)]

    np.testing.assert_allclose([float(v[0]) for v in values], [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose([float(v[1]) for v in values], [2.0, 2.0, 1.25, 0.5, 0.5], atol=1e-6)

    config.prior.ramp_fraction = 0.0
    assert [float(train.prior_schedule(config, p)[0]) for p in (0.1, 0.2, 0.9)] == [0.0, 1.0, 1.0]
    config.prior.warmup_fraction = 0.0
    assert train.prior_schedule(config, 0.0) == (1.0, 0.5)
    config.prior.entropy_scale_end = 1.0
    assert train.prior_schedule(config, 0.0) == (1.0, 2.0)


def test_dp_prior_is_off_during_warmup():
    config = tiny_config()
    k = config.model.class_num
    rng = np.random.default_rng(1)
    z = rng.normal(size=(8, config.model.feature_dim)).astype(np.float32)
    outputs = {
        "z": jax.numpy.asarray(z / np.linalg.norm(z, axis=1, keepdims=True)),
        "cluster_logits": jax.numpy.asarray(rng.normal(size=(8, k)).astype(np.float32)),
    }
    labels = jax.numpy.zeros((4,), np.int32)
    stats = train.initial_cluster_stats(k, config.model.feature_dim)

    def loss_at(progress):
        loss, (metrics, new_stats) = train.compute_loss_terms(
            outputs, labels, stats, config, num_images=50, progress=progress
        )
        return float(loss), metrics, new_stats

    early, early_metrics, early_stats = loss_at(0.1)
    late, late_metrics, _ = loss_at(1.0)

    terms = ["instance_loss", "cluster_loss"]
    base = sum(float(early_metrics[t]) for t in terms)
    assert early == pytest.approx(
        base + config.loss.entropy_weight * float(early_metrics["entropy_term"]), rel=1e-5
    )
    assert late == pytest.approx(
        base - config.prior.weight * float(late_metrics["log_prior"]), rel=1e-5
    )
    # The running statistics are updated during the warm-up, ready for when the prior starts.
    assert not np.allclose(early_stats["weights"], stats["weights"])


def test_unknown_prior_kind_raises():
    config = tiny_config()
    config.prior.kind = "dirichlet"
    k = config.model.class_num
    outputs = {"z": jax.numpy.ones((4, 4)) / 2, "cluster_logits": jax.numpy.zeros((4, k))}
    with pytest.raises(ValueError, match="prior.kind"):
        train.compute_loss_terms(
            outputs, jax.numpy.zeros((2,), int), train.initial_cluster_stats(k, 4), config
        )


def test_resume_equals_uninterrupted(tmp_path):
    config = tiny_config()
    dataset = make_dataset(config)  # 16 images, batch 8: 2 steps per epoch, 4 steps in all.

    straight = train.train(config, str(tmp_path / "straight"), dataset)
    interrupted_dir = str(tmp_path / "interrupted")
    partial = train.train(config, interrupted_dir, dataset, max_steps=3)
    assert int(partial.step) == 3
    resumed = train.train(config, interrupted_dir, dataset)

    assert int(resumed.step) == int(straight.step) == 4
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        jax.device_get(straight.params),
        jax.device_get(resumed.params),
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
        jax.device_get(straight.cluster_stats),
        jax.device_get(resumed.cluster_stats),
    )

    with open(os.path.join(interrupted_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    logged_steps = [r["step"] for r in records if "loss" in r]
    assert logged_steps == [1, 2, 3, 4]
    assert any("occupied_clusters" in r for r in records)
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)

    # The run stopped after step 3, in the middle of epoch 2; the epoch's cluster count must
    # still cover all of its images.
    with open(os.path.join(tmp_path / "straight", "metrics.jsonl")) as f:
        straight_records = [json.loads(line) for line in f]

    def epochs(rows):
        return [(r["epoch"], r["occupied_clusters"]) for r in rows if "occupied_clusters" in r]

    assert epochs(records) == epochs(straight_records)
    assert [epoch for epoch, _ in epochs(records)] == [1, 2]


def test_batch_larger_than_data_raises(tmp_path):
    config = tiny_config()
    config.train.batch_size = 32
    with pytest.raises(ValueError, match="batch_size"):
        train.train(config, str(tmp_path), make_dataset(config))


def test_batch_not_divisible_by_devices_raises(tmp_path):
    config = tiny_config()
    config.train.batch_size = 6
    with pytest.raises(ValueError, match="divisible"):
        train.train(config, str(tmp_path), make_dataset(config))


def test_restore_rejects_checkpoint_without_cluster_stats(tmp_path):
    from ihcc import configuration

    config = tiny_config()
    state = train.create_train_state(jax.random.key(0), config, 2, steps_per_epoch=2)
    # A checkpoint in the earlier layout: the mixture weights alone, under mixture_ema.
    old_layout = {
        "step": state.step,
        "params": state.params,
        "opt_state": state.opt_state,
        "batch_stats": state.batch_stats,
        "mixture_ema": state.cluster_stats["weights"],
    }
    manager = train.checkpoint_manager(str(tmp_path), config)
    manager.save(
        0,
        args=train.ocp.args.Composite(
            state=train.ocp.args.StandardSave(old_layout), meta=train.ocp.args.JsonSave({})
        ),
    )
    manager.wait_until_finished()

    with pytest.raises(configuration.ConfigError, match="new --workdir"):
        train.restore_checkpoint(manager, state)
