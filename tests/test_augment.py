"""Tests for ihcc.augment against numpy, colorsys and PIL references."""

import colorsys
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from ihcc import augment as augment_lib

BATCH = 8
SIZE = 16
OUT = 12

# One jitted function per configuration, shared by the tests, keeps compilations few.
_augment_default = jax.jit(functools.partial(augment_lib.augment, out_size=OUT))
_IDENTITY = dict(crop_scale=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0)
_augment_identity = jax.jit(functools.partial(augment_lib.augment, out_size=SIZE, **_IDENTITY))
_augment_flip = jax.jit(
    functools.partial(augment_lib.augment, out_size=SIZE, **{**_IDENTITY, "flip_prob": 1.0})
)
_augment_gray = jax.jit(
    functools.partial(augment_lib.augment, out_size=SIZE, **{**_IDENTITY, "grayscale_prob": 1.0})
)
_color_jitter = jax.jit(augment_lib._color_jitter)
_adjust_hue = jax.jit(augment_lib._adjust_hue)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def default_output(images):
    return np.asarray(_augment_default(jax.random.key(0), images))


# ----------------------------------------------------------------------------------------
# augment: keys, shapes and ranges.


def test_augment_shape_dtype_range(default_output):
    assert default_output.shape == (BATCH, OUT, OUT, 3)
    assert default_output.dtype == np.float32
    assert default_output.min() >= 0.0
    assert default_output.max() <= 1.0
    assert default_output.std() > 0.05


def test_augment_same_key_same_output(images, default_output):
    again = np.asarray(_augment_default(jax.random.key(0), images))
    np.testing.assert_array_equal(again, default_output)


def test_augment_different_keys_differ(images, default_output):
    other = np.asarray(_augment_default(jax.random.key(1), images))
    per_image_change = np.abs(other - default_output).mean(axis=(1, 2, 3))
    assert np.all(per_image_change > 0.01), per_image_change


def test_augment_raw_uint32_key(images):
    raw = np.asarray(_augment_default(jax.random.PRNGKey(3), images))
    assert raw.shape == (BATCH, OUT, OUT, 3)
    again = np.asarray(_augment_default(jax.random.PRNGKey(3), images))
    np.testing.assert_array_equal(raw, again)


def test_augment_images_get_own_draws(images):
    same = np.repeat(images[:1], BATCH, axis=0)
    out = np.asarray(_augment_default(jax.random.key(2), same))
    for b in range(1, BATCH):
        assert np.abs(out[b] - out[0]).mean() > 0.01, f"image {b} got the draw of image 0"


# ----------------------------------------------------------------------------------------
# augment: single stages switched on with the others off.


def test_identity_config_equals_preprocess(images):
    out = np.asarray(_augment_identity(jax.random.key(0), images))
    expected = np.asarray(augment_lib.preprocess(images, out_size=SIZE))
    np.testing.assert_allclose(out, expected, atol=1e-6)
    np.testing.assert_allclose(out, images / 255.0, atol=1e-6)


def test_identity_config_resized_equals_preprocess(images):
    augment = jax.jit(functools.partial(augment_lib.augment, out_size=OUT, **_IDENTITY))
    out = np.asarray(augment(jax.random.key(0), images))
    expected = np.asarray(augment_lib.preprocess(images, out_size=OUT))
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_flip_prob_one_mirrors_image(images):
    out = np.asarray(_augment_flip(jax.random.key(0), images))
    np.testing.assert_allclose(out, images[:, :, ::-1, :] / 255.0, atol=1e-6)


def test_grayscale_prob_one_uses_luma(images):
    pixels = images.copy()
    pixels[0, 5, 7] = (200, 100, 50)
    out = np.asarray(_augment_gray(jax.random.key(0), pixels))

    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    # 0.299 * 200 + 0.587 * 100 + 0.114 * 50 = 124.2
    np.testing.assert_allclose(out[0, 5, 7], [124.2 / 255.0] * 3, atol=1e-6)
    luma = (pixels @ np.array([0.299, 0.587, 0.114])) / 255.0
    np.testing.assert_allclose(out[..., 0], luma, atol=1e-6)


# ----------------------------------------------------------------------------------------
# preprocess.


def test_preprocess_same_size_scales_only(images):
    out = np.asarray(augment_lib.preprocess(images, out_size=SIZE))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, images / 255.0, atol=1e-7)


def test_preprocess_downsize_matches_pil(images):
    out = np.asarray(augment_lib.preprocess(images, out_size=OUT))
    for b in (0, 3):
        expected = _pil_resize(images[b].astype(np.float32) / 255.0, (0, 0, SIZE, SIZE), OUT)
        np.testing.assert_allclose(out[b], expected, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Crop and resize with a given box.


def _numpy_bilinear_crop(image, top, left, height, width, out_size):
    """Bilinear resize of image[top:top+height, left:left+width], half-pixel centres."""
    crop = image[top : top + height, left : left + width]
    out = np.zeros((out_size, out_size, image.shape[-1]))
    for o in range(out_size):
        y = min(max((o + 0.5) * height / out_size - 0.5, 0.0), height - 1)
        y0 = int(np.floor(y))
        y1 = min(y0 + 1, height - 1)
        for p in range(out_size):
            x = min(max((p + 0.5) * width / out_size - 0.5, 0.0), width - 1)
            x0 = int(np.floor(x))
            x1 = min(x0 + 1, width - 1)
            wy, wx = y - y0, x - x0
            top_row = (1 - wx) * crop[y0, x0] + wx * crop[y0, x1]
            bottom_row = (1 - wx) * crop[y1, x0] + wx * crop[y1, x1]
            out[o, p] = (1 - wy) * top_row + wy * bottom_row
    return out


def _pil_resize(image, box, out_size):
    """PIL bilinear resize of image[box] (box = left, top, right, bottom), per channel."""
    channels = []
    for c in range(image.shape[-1]):
        plane = Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32)).crop(box)
        channels.append(np.asarray(plane.resize((out_size, out_size), Image.BILINEAR)))
    return np.stack(channels, axis=-1)


def _boxes(*rows):
    top, left, height, width = np.asarray(rows, np.float32).T
    return augment_lib.CropBoxes(top=top, left=left, height=height, width=width)


def test_resized_crop_sub_box_matches_numpy():
    image = np.random.default_rng(1).random((2, 10, 12, 3)).astype(np.float32)
    boxes = _boxes((2, 3, 5, 6), (1, 7, 7, 5))
    flips = np.array([False, True])
    out = np.asarray(augment_lib._resized_crop(image, boxes, flips, 8))

    expected = _numpy_bilinear_crop(image[0], 2, 3, 5, 6, 8)
    np.testing.assert_allclose(out[0], expected, atol=1e-5)
    # Hand check of output pixel (0, 0): it samples the crop at (-0.1875, -0.125),
    # which clamps to the crop's top-left pixel.
    np.testing.assert_allclose(out[0, 0, 0], image[0, 2, 3], atol=1e-6)
    mirrored = _numpy_bilinear_crop(image[1], 1, 7, 7, 5, 8)[:, ::-1]
    np.testing.assert_allclose(out[1], mirrored, atol=1e-5)


def test_resized_crop_uint8_scales_to_unit():
    image = np.random.default_rng(2).integers(0, 256, (1, 10, 12, 3), dtype=np.uint8)
    out = np.asarray(augment_lib._resized_crop(image, _boxes((2, 3, 5, 6)), np.array([False]), 8))
    expected = _numpy_bilinear_crop(image[0] / 255.0, 2, 3, 5, 6, 8)
    np.testing.assert_allclose(out[0], expected, atol=1e-5)


def test_resized_crop_downsample_matches_pil():
    image = np.random.default_rng(3).random((1, 20, 20, 3)).astype(np.float32)
    out = np.asarray(augment_lib._resized_crop(image, _boxes((3, 2, 15, 13)), np.array([False]), 4))
    expected = _pil_resize(image[0], (2, 3, 15, 18), 4)
    np.testing.assert_allclose(out[0], expected, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Random crop boxes.


def _sample_boxes(height, width, scale, count):
    keys = jax.random.split(jax.random.key(4), count)
    sample = functools.partial(
        augment_lib._sample_crop_box,
        height=height,
        width=width,
        scale=scale,
        ratio=augment_lib._ASPECT_RATIO_RANGE,
    )
    boxes = jax.vmap(sample)(keys)
    return [np.asarray(v) for v in boxes]


def test_crop_boxes_follow_torchvision_rule():
    size = 32
    top, left, height, width = _sample_boxes(size, size, (0.08, 1.0), 2000)

    assert np.all(height >= 1)
    assert np.all(width >= 1)
    assert np.all(top >= 0)
    assert np.all(left >= 0)
    assert np.all(top + height <= size)
    assert np.all(left + width <= size)
    for value in (top, left, height, width):
        np.testing.assert_array_equal(value, np.round(value))

    # Rounding each side to whole pixels moves the area and the ratio a little.
    area = height * width / size**2
    ratio = width / height
    assert area.min() > 0.08 * 0.8
    assert area.min() < 0.15
    assert area.max() > 0.9
    assert ratio.min() > 0.75 * 0.85
    assert ratio.max() < 4 / 3 / 0.85
    # Offsets are uniform over the free room: their mean is about half of it.
    room = size - height
    free = room > 0
    assert 0.4 < (top[free] / room[free]).mean() < 0.6
    assert 0.4 < ((left / np.maximum(size - width, 1))[size - width > 0]).mean() < 0.6


def test_crop_boxes_fall_back_to_centre_crop():
    # No area fraction in (2, 3) fits, so every draw falls back to the centre crop, with
    # the aspect ratio clamped to 4/3: height 20, width round(20 * 4/3) = 27.
    top, left, height, width = _sample_boxes(20, 40, (2.0, 3.0), 16)
    np.testing.assert_array_equal(height, 20)
    np.testing.assert_array_equal(width, 27)
    np.testing.assert_array_equal(top, 0)
    np.testing.assert_array_equal(left, (40 - 27) // 2)


# ----------------------------------------------------------------------------------------
# Colour jitter.


def _jitter_params(brightness, contrast, saturation, hue, order):
    return augment_lib.JitterParams(
        brightness=np.asarray(brightness, np.float32),
        contrast=np.asarray(contrast, np.float32),
        saturation=np.asarray(saturation, np.float32),
        hue=np.asarray(hue, np.float32),
        order=np.asarray(order, np.int32),
    )


def _torchvision_jitter(image, brightness, contrast, saturation, hue, order):
    """torchvision's ColorJitter ops on one float image, in numpy and colorsys."""

    def gray(x):
        return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]

    def blend(x, target, factor):
        return np.clip(factor * x + (1.0 - factor) * target, 0.0, 1.0)

    def rotate_hue(x):
        out = np.empty_like(x)
        for index in np.ndindex(x.shape[:-1]):
            h, s, v = colorsys.rgb_to_hsv(*x[index])
            out[index] = colorsys.hsv_to_rgb((h + hue) % 1.0, s, v)
        return out

    x = image.astype(np.float64)
    for op in order:
        if op == 0:
            x = blend(x, 0.0, brightness)
        elif op == 1:
            x = blend(x, gray(x).mean(), contrast)
        elif op == 2:
            x = blend(x, gray(x)[..., None], saturation)
        else:
            x = rotate_hue(x)
    return x


@pytest.fixture(scope="module")
def jitter_images():
    return np.random.default_rng(5).random((4, 6, 6, 3)).astype(np.float32)


def test_brightness_only_jitter_matches_formula(jitter_images):
    factors = [1.3, 0.6, 1.0, 1.7]
    params = _jitter_params(factors, [1.0] * 4, [1.0] * 4, [0.0] * 4, [[0, 1, 2, 3]] * 4)
    out = np.asarray(_color_jitter(jitter_images, params))
    expected = np.clip(np.asarray(factors)[:, None, None, None] * jitter_images, 0.0, 1.0)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_jitter_follows_each_image_order(jitter_images):
    brightness = [1.3, 0.7, 1.2, 0.9]
    contrast = [0.6, 1.4, 0.8, 1.3]
    saturation = [1.5, 0.5, 0.3, 1.2]
    hue = [0.1, -0.08, 0.3, -0.45]
    orders = [[3, 0, 1, 2], [2, 1, 0, 3], [1, 3, 2, 0], [0, 2, 3, 1]]
    params = _jitter_params(brightness, contrast, saturation, hue, orders)
    out = np.asarray(_color_jitter(jitter_images, params))
    for b in range(4):
        expected = _torchvision_jitter(
            jitter_images[b], brightness[b], contrast[b], saturation[b], hue[b], orders[b]
        )
        np.testing.assert_allclose(out[b], expected, atol=1e-5, err_msg=f"order {orders[b]}")


def test_jitter_order_matters(jitter_images):
    same = np.repeat(jitter_images[:1], 4, axis=0)
    orders = [[0, 1, 2, 3], [1, 0, 2, 3], [0, 1, 2, 3], [1, 0, 2, 3]]
    params = _jitter_params([1.6] * 4, [0.5] * 4, [1.0] * 4, [0.0] * 4, orders)
    out = np.asarray(_color_jitter(same, params))
    np.testing.assert_array_equal(out[0], out[2])
    assert np.abs(out[0] - out[1]).max() > 0.01


def test_hue_shift_zero_is_identity(jitter_images):
    out = np.asarray(_adjust_hue(jitter_images, np.zeros(4, np.float32)))
    np.testing.assert_allclose(out, jitter_images, atol=1e-6)


def test_hue_third_turn_maps_red_to_green():
    colours = np.zeros((4, 6, 6, 3), np.float32)
    colours[0, ...] = (1.0, 0.0, 0.0)
    colours[1, ...] = (0.0, 1.0, 0.0)
    colours[2, ...] = (1.0, 0.0, 0.0)
    colours[3, ...] = (0.8, 0.4, 0.2)
    shifts = np.array([1 / 3, 1 / 3, -1 / 3, 0.25], np.float32)
    out = np.asarray(_adjust_hue(colours, shifts))

    np.testing.assert_allclose(out[0, 0, 0], (0.0, 1.0, 0.0), atol=1e-6)
    np.testing.assert_allclose(out[1, 0, 0], (0.0, 0.0, 1.0), atol=1e-6)
    np.testing.assert_allclose(out[2, 0, 0], (0.0, 0.0, 1.0), atol=1e-6)
    h, s, v = colorsys.rgb_to_hsv(0.8, 0.4, 0.2)
    expected = colorsys.hsv_to_rgb((h + 0.25) % 1.0, s, v)
    np.testing.assert_allclose(out[3, 0, 0], expected, atol=1e-6)


def test_jitter_params_follow_torchvision_ranges():
    keys = jax.random.split(jax.random.key(6), 4000)
    sample = functools.partial(augment_lib._sample_jitter_params, strength=0.5, apply_prob=0.8)
    params = jax.vmap(sample)(keys)
    brightness, contrast, saturation, hue, order = (np.asarray(v) for v in params)

    applied = hue != 0.0
    assert 0.77 < applied.mean() < 0.83
    for factor in (brightness, contrast, saturation):
        np.testing.assert_array_equal(factor[~applied], 1.0)
        assert factor[applied].min() >= 0.6
        assert factor[applied].max() <= 1.4
        assert factor[applied].min() < 0.62
        assert factor[applied].max() > 1.38
    assert np.abs(hue).max() <= 0.1
    assert hue.min() < -0.098
    assert hue.max() > 0.098
    np.testing.assert_array_equal(np.sort(order, axis=1), np.tile(np.arange(4), (len(order), 1)))
    assert len({tuple(row) for row in order}) == 24


# ----------------------------------------------------------------------------------------
# Sharding and argument checks.


def test_sharded_equals_unsharded(images, default_output):
    if jax.device_count() < 4:
        pytest.skip("needs 4 devices; tests/conftest.py sets 4 fake CPU devices")
    mesh = Mesh(np.asarray(jax.devices()[:4]), ("data",))
    sharded = jax.device_put(images, NamedSharding(mesh, PartitionSpec("data")))
    out = _augment_default(jax.random.key(0), sharded)
    assert out.sharding.spec[0] == "data"
    np.testing.assert_allclose(np.asarray(out), default_output, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(crop_scale=(0.0, 1.0)), ValueError),
        (dict(crop_scale=(0.5, 0.2)), ValueError),
        (dict(crop_scale=0.5), ValueError),
        (dict(flip_prob=1.5), ValueError),
        (dict(jitter_prob=-0.1), ValueError),
        (dict(grayscale_prob=2.0), ValueError),
        (dict(jitter_strength=3.0), ValueError),
        (dict(out_size=0), ValueError),
        (dict(out_size=8.0), ValueError),
    ],
)
def test_augment_rejects_invalid_arguments(images, kwargs, error):
    kwargs = {"out_size": OUT, **kwargs}
    with pytest.raises(error):
        augment_lib.augment(jax.random.key(0), images, **kwargs)


def test_augment_rejects_float_images(images):
    with pytest.raises(TypeError, match="uint8"):
        augment_lib.augment(jax.random.key(0), images / 255.0, out_size=OUT)


def test_preprocess_rejects_missing_batch_axis(images):
    with pytest.raises(ValueError, match="batch"):
        augment_lib.preprocess(images[0], out_size=OUT)
