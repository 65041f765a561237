"""Tests for the ResNet backbones, the small-map convolution path and the IH-CC heads."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ihcc import models

IMAGE_SIZE = 32
BATCH = 4


def _leaf_count(tree) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


@pytest.fixture(scope="module")
def images():
    return jax.random.uniform(jax.random.key(1), (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3))


@pytest.fixture(scope="module")
def model_and_variables(images):
    model = models.IHCC(depth=18, feature_dim=16, class_num=10, num_participants=3)
    variables = model.init(jax.random.key(0), images, train=False)
    return model, variables


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_im2col_matches_lax_on_small_map(stride):
    # A 2x2 map under a 3x3 kernel: the case that takes the im2col path.
    x = jax.random.normal(jax.random.key(0), (3, 2, 2, 5))
    kwargs = dict(features=7, kernel_size=(3, 3), strides=(stride, stride),
                  padding=((1, 1), (1, 1)))
    im2col_conv = models.Conv(**kwargs, im2col_small_maps=True)
    lax_conv = models.Conv(**kwargs, im2col_small_maps=False)
    params = im2col_conv.init(jax.random.key(1), x)

    assert im2col_conv.uses_im2col(x.shape)
    assert not lax_conv.uses_im2col(x.shape)
    fast = im2col_conv.apply(params, x)
    plain = lax_conv.apply(params, x)
    assert fast.shape == plain.shape
    np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-5)


def test_conv_matches_flax_conv_parameters():
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 4))
    conv = models.Conv(6, (3, 3), (2, 2), ((1, 1), (1, 1)))
    params = conv.init(jax.random.key(1), x)
    reference = nn.Conv(6, (3, 3), (2, 2), ((1, 1), (1, 1)), use_bias=False)

    assert not conv.uses_im2col(x.shape)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, reference.init(jax.random.key(1), x))
    np.testing.assert_allclose(conv.apply(params, x), reference.apply(params, x),
                               rtol=1e-5, atol=1e-5)


def test_conv_init_is_kaiming_fan_out():
    conv = models.Conv(256, (3, 3))
    kernel = conv.init(jax.random.key(0), jnp.zeros((1, 8, 8, 128)))["params"]["kernel"]
    expected_std = np.sqrt(2.0 / (256 * 3 * 3))
    assert abs(float(jnp.std(kernel)) / expected_std - 1.0) < 0.02
    assert abs(float(jnp.mean(kernel))) < 0.05 * expected_std


def test_ihcc_output_shapes(model_and_variables, images):
    model, variables = model_and_variables
    outputs = model.apply(variables, images, train=False)

    assert set(outputs) == {"features", "z", "cluster_logits", "participant_logits"}
    assert outputs["features"].shape == (BATCH, 512)
    assert outputs["z"].shape == (BATCH, 16)
    assert outputs["cluster_logits"].shape == (BATCH, 10)
    assert outputs["participant_logits"].shape == (BATCH, 3)
    for name, value in outputs.items():
        assert value.dtype == jnp.float32, name
        assert bool(jnp.all(jnp.isfinite(value))), name


def test_ihcc_z_has_unit_norm(model_and_variables, images):
    model, variables = model_and_variables
    z = model.apply(variables, images, train=False)["z"]
    np.testing.assert_allclose(jnp.linalg.norm(z, axis=-1), np.ones(BATCH), rtol=1e-5)


def test_ihcc_im2col_flag_keeps_output(model_and_variables, images):
    # At 32 px the first conv of layer4 gets a 2x2 map, so the two settings take different paths.
    model, variables = model_and_variables
    plain_model = models.IHCC(depth=18, feature_dim=16, class_num=10, num_participants=3,
                              im2col_small_maps=False)
    fast = model.apply(variables, images, train=False)
    plain = plain_model.apply(variables, images, train=False)
    for name in fast:
        np.testing.assert_allclose(fast[name], plain[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_ihcc_without_participant_head(model_and_variables, images):
    model = models.IHCC(depth=18, feature_dim=16, class_num=10, num_participants=0)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    assert set(shapes["params"]) == {"backbone", "instance_head", "cluster_head"}

    # The same weights without the participant head are a complete variable set.
    _, with_head = model_and_variables
    variables = {
        "params": {k: v for k, v in with_head["params"].items() if k != "participant_head"},
        "batch_stats": with_head["batch_stats"],
    }
    outputs = model.apply(variables, images, train=False)
    assert "participant_logits" not in outputs
    assert outputs["cluster_logits"].shape == (BATCH, 10)


def test_head_layer_shapes(model_and_variables):
    _, variables = model_and_variables
    params = variables["params"]
    assert params["instance_head"]["hidden"]["kernel"].shape == (512, 512)
    assert params["instance_head"]["output"]["kernel"].shape == (512, 16)
    assert params["cluster_head"]["hidden"]["kernel"].shape == (512, 512)
    assert params["cluster_head"]["output"]["kernel"].shape == (512, 10)
    assert params["participant_head"]["output"]["kernel"].shape == (512, 3)


def test_eval_mode_keeps_batch_stats(model_and_variables, images):
    model, variables = model_and_variables
    _, updates = model.apply(variables, images, train=False, mutable=["batch_stats"])
    for before, after in zip(jax.tree.leaves(variables["batch_stats"]),
                             jax.tree.leaves(updates["batch_stats"])):
        np.testing.assert_array_equal(before, after)

    # Running averages make each image's eval output independent of the rest of the batch.
    whole = model.apply(variables, images, train=False)["features"]
    half = model.apply(variables, images[:2], train=False)["features"]
    np.testing.assert_allclose(half, whole[:2], rtol=1e-5, atol=1e-5)


def test_train_mode_updates_batch_stats(model_and_variables, images):
    model, variables = model_and_variables
    outputs, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    new_stats = updates["batch_stats"]

    changed = [
        not np.array_equal(before, after)
        for before, after in zip(jax.tree.leaves(variables["batch_stats"]),
                                 jax.tree.leaves(new_stats))
    ]
    assert all(changed)

    # bn1 follows the stem conv: running mean = 0.9 * old + 0.1 * batch mean of conv1's output.
    mean = jnp.asarray(models.IMAGENET_MEAN)
    std = jnp.asarray(models.IMAGENET_STD)
    stem = models.Conv(64, (7, 7), (2, 2), ((3, 3), (3, 3)))
    stem_out = stem.apply({"params": variables["params"]["backbone"]["conv1"]},
                          (images - mean) / std)
    old_mean = variables["batch_stats"]["backbone"]["bn1"]["mean"]
    expected = 0.9 * old_mean + 0.1 * jnp.mean(stem_out, axis=(0, 1, 2))
    np.testing.assert_allclose(new_stats["backbone"]["bn1"]["mean"], expected,
                               rtol=1e-4, atol=1e-5)

    # Batch statistics couple the images: the first two outputs change with the rest.
    half, _ = model.apply(variables, images[:2], train=True, mutable=["batch_stats"])
    assert not np.allclose(half["features"], outputs["features"][:2], atol=1e-4)


@pytest.mark.parametrize("depth, expected", [(18, 11_176_512), (34, 21_284_672),
                                             (50, 23_508_032)])
def test_backbone_param_count_matches_torchvision(depth, expected):
    # torchvision resnet{18,34,50} parameters (conv weights, BN weight and bias) without fc:
    # 11,689,512 - 513,000; 21,797,672 - 513,000; 25,557,032 - 2,049,000.
    model = models.IHCC(depth=depth, feature_dim=8, class_num=4)
    x = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    assert _leaf_count(shapes["params"]["backbone"]) == expected


def test_resnet50_layout_shapes():
    model = models.IHCC(depth=50, feature_dim=128, class_num=20, num_participants=4)
    x = jnp.zeros((2, 64, 64, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    backbone = variables["params"]["backbone"]
    stats = variables["batch_stats"]["backbone"]

    assert backbone["conv1"]["kernel"].shape == (7, 7, 3, 64)
    assert backbone["layer1_0"]["conv1"]["kernel"].shape == (1, 1, 64, 64)
    assert backbone["layer1_0"]["conv2"]["kernel"].shape == (3, 3, 64, 64)
    assert backbone["layer1_0"]["conv3"]["kernel"].shape == (1, 1, 64, 256)
    assert backbone["layer1_0"]["downsample_conv"]["kernel"].shape == (1, 1, 64, 256)
    assert "downsample_conv" not in backbone["layer1_1"]
    assert backbone["layer4_2"]["conv3"]["kernel"].shape == (1, 1, 512, 2048)
    assert stats["layer4_2"]["bn3"]["var"].shape == (2048,)
    blocks = sorted(name for name in backbone if name.startswith("layer"))
    assert len(blocks) == 3 + 4 + 6 + 3
    assert variables["params"]["instance_head"]["hidden"]["kernel"].shape == (2048, 2048)

    outputs = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    assert outputs["features"].shape == (2, 2048)
    assert outputs["z"].shape == (2, 128)
    assert outputs["cluster_logits"].shape == (2, 20)
    assert outputs["participant_logits"].shape == (2, 4)


def test_ihcc_rejects_bad_arguments(images):
    with pytest.raises(ValueError, match="depth 101"):
        models.IHCC(depth=101).init(jax.random.key(0), images, train=False)
    with pytest.raises(ValueError, match="num_participants"):
        models.IHCC(num_participants=-1).init(jax.random.key(0), images, train=False)
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        models.IHCC().init(jax.random.key(0), images[..., :1], train=False)
