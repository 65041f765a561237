"""On-device image augmentation for contrastive clustering, in JAX.

`augment` applies the SimCLR recipe that contrastive clustering (CC) trains with, per image:
random resized crop, horizontal flip, colour jitter in random order (applied with a
probability) and random grayscale. It follows the definitions of torchvision's
RandomResizedCrop, RandomHorizontalFlip, ColorJitter and RandomGrayscale, runs inside a
jitted train step and takes an explicit PRNG key. `preprocess` is the deterministic
evaluation transform.

Differences from CC's pipeline, which runs these transforms on PIL images: every stage
works on float32 in [0, 1], so nothing is rounded to uint8 between the colour ops. The
grayscale weights are the ITU-R 601-2 luma weights (0.299, 0.587, 0.114) that PIL uses;
torchvision's tensor functions use 0.2989 for red.

Resampling is separable: each output row and column is a fixed weighted sum of input rows
and columns, so a crop + resize (+ flip) is two small matrix products per image. The
weights are PIL's bilinear (triangle) filter: plain bilinear interpolation with
half-pixel centres when upsampling, and a triangle filter widened by the scale factor
(antialiased, as PIL and torchvision's `antialias=True` do) when downsampling. Samples
never reach outside the crop box, as in torchvision's crop-then-resize.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# ITU-R 601-2 luma weights, as PIL's convert("L") uses them.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# torchvision RandomResizedCrop defaults: aspect ratio range and number of tries before
# falling back to a centre crop.
_ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
_CROP_TRIES = 10

# Colour-op ids in ColorJitter's order: the random order is a permutation of these.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3


class CropBoxes(NamedTuple):
    """Per-image crop boxes in input pixels, float32 [B] each (whole numbers)."""

    top: jax.Array
    left: jax.Array
    height: jax.Array
    width: jax.Array


class JitterParams(NamedTuple):
    """Per-image colour jitter parameters, float32 [B] unless noted.

    A factor of 1 and a hue shift of 0 leave the image unchanged. `order` is an int32
    [B, 4] permutation of the op ids (0 brightness, 1 contrast, 2 saturation, 3 hue).
    """

    brightness: jax.Array
    contrast: jax.Array
    saturation: jax.Array
    hue: jax.Array
    order: jax.Array


def augment(
    rng: jax.Array,
    images: jax.Array,
    *,
    out_size: int,
    jitter_strength: float = 0.5,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    flip_prob: float = 0.5,
    jitter_prob: float = 0.8,
    grayscale_prob: float = 0.2,
) -> jax.Array:
    """Augment a batch with CC's SimCLR recipe, one independent draw per image.

    Args:
      rng: PRNG key. Image b uses `jax.random.split(rng, B)[b]`, so a fixed key and batch
        give the same output whatever the device layout.
      images: uint8 [B, H, W, 3] (H == W in this project). May be sharded over the batch.
      out_size: side of the square output in pixels.
      jitter_strength: s in ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s); at most 2.5, because
        torchvision limits the hue shift to 0.5.
      crop_scale: range of the crop area as a fraction of the image area.
      flip_prob, jitter_prob, grayscale_prob: probabilities of a horizontal flip, of the
        colour jitter and of converting to grayscale.

    The hyperparameters must be Python numbers (they shape the computation), not traced
    values.

    Returns:
      float32 [B, out_size, out_size, 3] in [0, 1].
    """
    _check_images(images)
    _check_out_size(out_size)
    low, high = _check_crop_scale(crop_scale)
    flip_prob = _check_probability("flip_prob", flip_prob)
    jitter_prob = _check_probability("jitter_prob", jitter_prob)
    grayscale_prob = _check_probability("grayscale_prob", grayscale_prob)
    jitter_strength = _check_jitter_strength(jitter_strength)

    batch, height, width, _ = images.shape
    image_keys = jax.random.split(rng, batch)
    stage_keys = jax.vmap(lambda key: jax.random.split(key, 4))(image_keys)
    crop_keys, flip_keys = stage_keys[:, 0], stage_keys[:, 1]
    jitter_keys, grayscale_keys = stage_keys[:, 2], stage_keys[:, 3]

    boxes = jax.vmap(
        lambda key: _sample_crop_box(key, height, width, (low, high), _ASPECT_RATIO_RANGE)
    )(crop_keys)
    flips = jax.vmap(lambda key: jax.random.bernoulli(key, flip_prob))(flip_keys)
    x = _resized_crop(images, boxes, flips, out_size)

    if jitter_strength > 0.0 and jitter_prob > 0.0:
        params = jax.vmap(lambda key: _sample_jitter_params(key, jitter_strength, jitter_prob))(
            jitter_keys
        )
        x = _color_jitter(x, params)

    if grayscale_prob > 0.0:
        to_gray = jax.vmap(lambda key: jax.random.bernoulli(key, grayscale_prob))(grayscale_keys)
        x = jnp.where(to_gray[:, None, None, None], _grayscale(x)[..., None], x)

    return jnp.clip(x, 0.0, 1.0)


def preprocess(images: jax.Array, *, out_size: int) -> jax.Array:
    """Convert uint8 [B, H, W, 3] images to float32 [B, out_size, out_size, 3] in [0, 1].

    Resizes the whole image with the same filter as `augment` only when its size differs
    from out_size. No randomness: this is the evaluation transform.
    """
    _check_images(images)
    _check_out_size(out_size)
    batch, height, width, _ = images.shape
    if height == out_size and width == out_size:
        return images.astype(jnp.float32) / 255.0

    full = jnp.ones((batch,), jnp.float32)
    boxes = CropBoxes(top=0.0 * full, left=0.0 * full, height=height * full, width=width * full)
    return jnp.clip(_resized_crop(images, boxes, jnp.zeros((batch,), bool), out_size), 0.0, 1.0)


# ----------------------------------------------------------------------------------------
# Argument checks. They run at trace time on Python values.


def _check_images(images: Any) -> None:
    shape = getattr(images, "shape", None)
    dtype = getattr(images, "dtype", None)
    if shape is None or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(
            f"images must have shape [batch, height, width, 3], got {shape}. "
            "Add a batch axis or convert the images to RGB"
        )
    if dtype != jnp.uint8:
        raise TypeError(
            f"images must be uint8 RGB in [0, 255], got dtype {dtype}. "
            "Pass the decoded uint8 images, not normalised floats"
        )


def _check_out_size(out_size: Any) -> None:
    if isinstance(out_size, bool) or not isinstance(out_size, int) or out_size < 1:
        raise ValueError(f"out_size must be a positive int, got {out_size!r}")


def _check_probability(name: str, value: Any) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
    return value


def _check_crop_scale(crop_scale: Any) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in crop_scale)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"crop_scale must be a pair (min, max) of area fractions, got {crop_scale!r}"
        ) from error
    if not 0.0 < low <= high:
        raise ValueError(
            f"crop_scale must satisfy 0 < min <= max, got {crop_scale!r}. "
            "The default is (0.08, 1.0)"
        )
    return low, high


def _check_jitter_strength(strength: Any) -> float:
    strength = float(strength)
    if not 0.0 <= strength <= 2.5:
        raise ValueError(
            f"jitter_strength must be in [0, 2.5] so that the hue shift 0.2 * "
            f"jitter_strength stays within 0.5, got {strength}"
        )
    return strength


# ----------------------------------------------------------------------------------------
# Random resized crop and flip.


def _sample_crop_box(
    key: jax.Array,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> CropBoxes:
    """Sample one crop box with torchvision RandomResizedCrop's rule.

    torchvision draws up to 10 (area, aspect ratio) candidates and takes the first whose
    rounded size fits in the image. Here all 10 are drawn at once and the first valid one
    is picked. If none fits, the box is the centre crop with the aspect ratio clamped to
    `ratio`, as in torchvision. Returns scalars (vmap this for a batch).
    """
    area_key, ratio_key, top_key, left_key = jax.random.split(key, 4)
    area = float(height * width)
    target_area = area * jax.random.uniform(
        area_key, (_CROP_TRIES,), minval=scale[0], maxval=scale[1]
    )
    log_ratio = jax.random.uniform(
        ratio_key, (_CROP_TRIES,), minval=math.log(ratio[0]), maxval=math.log(ratio[1])
    )
    aspect = jnp.exp(log_ratio)
    # jnp.round rounds half to even, like Python's round() in torchvision.
    widths = jnp.round(jnp.sqrt(target_area * aspect))
    heights = jnp.round(jnp.sqrt(target_area / aspect))
    valid = (widths > 0) & (widths <= width) & (heights > 0) & (heights <= height)
    first = jnp.argmax(valid)
    found = valid[first]

    fallback_h, fallback_w = _fallback_crop_size(height, width, ratio)
    crop_h = jnp.where(found, heights[first], float(fallback_h))
    crop_w = jnp.where(found, widths[first], float(fallback_w))

    # torch.randint(0, height - h + 1): uniform over the valid offsets.
    top_random = jnp.floor(jax.random.uniform(top_key) * (height - crop_h + 1.0))
    left_random = jnp.floor(jax.random.uniform(left_key) * (width - crop_w + 1.0))
    top_centred = float((height - fallback_h) // 2)
    left_centred = float((width - fallback_w) // 2)
    top = jnp.where(found, jnp.minimum(top_random, height - crop_h), top_centred)
    left = jnp.where(found, jnp.minimum(left_random, width - crop_w), left_centred)
    return CropBoxes(top=top, left=left, height=crop_h, width=crop_w)


def _fallback_crop_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    in_ratio = width / height
    if in_ratio < min(ratio):
        return int(round(width / min(ratio))), width
    if in_ratio > max(ratio):
        return height, int(round(height * max(ratio)))
    return height, width


def _resample_weights(
    origin: jax.Array,
    step: jax.Array,
    box_start: jax.Array,
    box_size: jax.Array,
    in_size: int,
    out_size: int,
) -> jax.Array:
    """Build the [B, out_size, in_size] weights of a 1-D resampling along one axis.

    Output sample o sits at input coordinate origin + o * step (pixel centres at whole
    numbers). A negative step mirrors the axis. Each weight is PIL's triangle filter
    of radius max(|step|, 1), restricted to the box and normalised to sum to 1. Inside
    the box this is bilinear interpolation with edge clamping when |step| <= 1.
    """
    positions = origin[:, None] + step[:, None] * jnp.arange(out_size, dtype=jnp.float32)
    radius = jnp.maximum(jnp.abs(step), 1.0)[:, None, None]
    pixels = jnp.arange(in_size, dtype=jnp.float32)
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(pixels - positions[..., None]) / radius)
    inside = (pixels >= box_start[:, None, None]) & (
        pixels < (box_start + box_size)[:, None, None]
    )
    weights = jnp.where(inside, weights, 0.0)
    # Every sample lies within half a pixel of the box, so each row has a positive weight.
    return weights / jnp.sum(weights, axis=-1, keepdims=True)


def _resized_crop(images: jax.Array, boxes: CropBoxes, flips: jax.Array, out_size: int) -> jax.Array:
    """Crop each image to its box, resize it to out_size and mirror it where `flips` is set.

    `images` is uint8 (or float) [B, H, W, 3]. Returns float32 in [0, 1] when the input is
    uint8, else in the input's range.
    """
    _, height, width, _ = images.shape
    step_y = boxes.height / out_size
    step_x = boxes.width / out_size
    # The centre of output pixel o maps to box_start + (o + 0.5) * step - 0.5. The flip
    # reads the box from its right edge with a negative step instead.
    origin_y = boxes.top + 0.5 * step_y - 0.5
    origin_x = jnp.where(
        flips,
        boxes.left + boxes.width - 0.5 * step_x - 0.5,
        boxes.left + 0.5 * step_x - 0.5,
    )
    signed_step_x = jnp.where(flips, -step_x, step_x)

    rows = _resample_weights(origin_y, step_y, boxes.top, boxes.height, height, out_size)
    cols = _resample_weights(origin_x, signed_step_x, boxes.left, boxes.width, width, out_size)
    if images.dtype == jnp.uint8:
        rows = rows / 255.0
    pixels = images.astype(jnp.float32)
    # HIGHEST keeps the products in float32 on GPUs, whose default for float32 matrix
    # products may round the inputs to TF32 (about 3 significant digits).
    highest = jax.lax.Precision.HIGHEST
    resized = jnp.einsum("boh,bhwc->bowc", rows, pixels, precision=highest)
    return jnp.einsum("bpw,bowc->bopc", cols, resized, precision=highest)


# ----------------------------------------------------------------------------------------
# Colour jitter and grayscale, on float32 [B, H, W, 3] in [0, 1].


def _grayscale(x: jax.Array) -> jax.Array:
    red, green, blue = LUMA_WEIGHTS
    return red * x[..., 0] + green * x[..., 1] + blue * x[..., 2]


def _sample_jitter_params(key: jax.Array, strength: float, apply_prob: float) -> JitterParams:
    """Sample ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s) for one image, applied with apply_prob.

    Factors are uniform in [max(0, 1 - 0.8 s), 1 + 0.8 s] and the hue shift is uniform in
    [-0.2 s, 0.2 s], as torchvision draws them. A skipped jitter gets identity values.
    """
    apply_key, factor_key, hue_key, order_key = jax.random.split(key, 4)
    apply = jax.random.bernoulli(apply_key, apply_prob)
    spread = 0.8 * strength
    factors = jax.random.uniform(
        factor_key, (3,), minval=max(0.0, 1.0 - spread), maxval=1.0 + spread
    )
    factors = jnp.where(apply, factors, 1.0)
    hue_limit = 0.2 * strength
    hue = jax.random.uniform(hue_key, (), minval=-hue_limit, maxval=hue_limit)
    hue = jnp.where(apply, hue, 0.0)
    order = jax.random.permutation(order_key, 4)
    return JitterParams(
        brightness=factors[0],
        contrast=factors[1],
        saturation=factors[2],
        hue=hue,
        order=order.astype(jnp.int32),
    )


def _color_jitter(x: jax.Array, params: JitterParams) -> jax.Array:
    """Apply brightness, contrast, saturation and hue to each image in its own order.

    The three blend ops run in six fixed slots, three before the hue step and three
    after it. Each image fills the slots before the hue step with the blend ops that
    precede hue in its order and the slots after it with the rest. An unused slot gets
    factor 1, which is an exact no-op. So the costly hue conversion runs once, not once
    per possible position.
    """
    order = params.order
    hue_position = jnp.argmax(order == _HUE, axis=1)
    # The blend ops in the image's order, with hue removed (a stable sort keeps the order).
    without_hue = jnp.argsort(order == _HUE, axis=1, stable=True)[:, :3]
    blend_ops = jnp.take_along_axis(order, without_hue, axis=1)
    factors_by_op = jnp.stack([params.brightness, params.contrast, params.saturation], axis=1)
    blend_factors = jnp.take_along_axis(factors_by_op, blend_ops, axis=1)
    slots = jnp.arange(3)
    before_hue = slots[None, :] < hue_position[:, None]
    factors_before = jnp.where(before_hue, blend_factors, 1.0)
    factors_after = jnp.where(before_hue, 1.0, blend_factors)

    def blend_slot(images, slot_params):
        op, factor = slot_params
        return _blend_op(images, op, factor), None

    # Each slot runs as one step of a scan, so the image is written out between slots.
    # Unrolled, XLA on CPU (jax 0.10.2) fuses every slot into the next and recomputes the
    # whole chain once per slot, and jax.lax.optimization_barrier does not prevent that.
    x, _ = jax.lax.scan(blend_slot, x, (blend_ops.T, factors_before.T))
    x = jnp.where((params.hue != 0.0)[:, None, None, None], _adjust_hue(x, params.hue), x)
    x, _ = jax.lax.scan(blend_slot, x, (blend_ops.T, factors_after.T))
    return x


def _blend_op(x: jax.Array, op: jax.Array, factor: jax.Array) -> jax.Array:
    """Apply brightness, contrast or saturation (per-image op id) with per-image factors.

    All three are torchvision's `_blend(img, target, factor)`, clip(factor * img +
    (1 - factor) * target, 0, 1), with target 0 (brightness), the image's mean grayscale
    value (contrast) or the pixel's grayscale value (saturation).
    """
    gray = _grayscale(x)
    mean_gray = jnp.mean(gray, axis=(1, 2))
    use_pixel = (op == _SATURATION).astype(x.dtype)[:, None, None]
    use_mean = jnp.where(op == _CONTRAST, mean_gray, 0.0)[:, None, None]
    target = use_pixel * gray + use_mean
    factor = factor[:, None, None, None]
    return jnp.clip(factor * x + (1.0 - factor) * target[..., None], 0.0, 1.0)


def _adjust_hue(x: jax.Array, shift: jax.Array) -> jax.Array:
    """Rotate the hue of each image by `shift` turns (per image, in [-0.5, 0.5]).

    Same result as torchvision's RGB -> HSV, (h + shift) mod 1, HSV -> RGB: HSV keeps
    the max and min channel, so each output channel is max - (max - min) * clip(min(k,
    4 - k), 0, 1) with k = (n + 6 h) wrapped to [0, 6) and n = 5, 3, 1 for red, green,
    blue. The wrap uses comparisons, not jnp.mod, which is slow on CPU.
    """
    red, green, blue = x[..., 0], x[..., 1], x[..., 2]
    max_c = jnp.maximum(jnp.maximum(red, green), blue)
    min_c = jnp.minimum(jnp.minimum(red, green), blue)
    chroma = max_c - min_c
    # Hue in sixths of a turn, in [-1, 5], with torchvision's tie-breaking (red, then
    # green). One division for all three cases keeps this a single fused loop.
    red_is_max = max_c == red
    green_is_max = max_c == green
    numerator = jnp.where(red_is_max, green - blue, jnp.where(green_is_max, blue - red, red - green))
    base = jnp.where(red_is_max, 0.0, jnp.where(green_is_max, 2.0, 4.0))
    hue6 = base + numerator / jnp.where(chroma > 0.0, chroma, 1.0)
    hue6 = hue6 + 6.0 * shift[:, None, None]
    hue6 = _wrap_sixths(hue6)

    channels = []
    for offset in (5.0, 3.0, 1.0):
        k = _wrap_sixths(hue6 + offset)
        channels.append(max_c - chroma * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0))
    return jnp.stack(channels, axis=-1)


def _wrap_sixths(value: jax.Array) -> jax.Array:
    """Wrap a hue in sixths of a turn from [-6, 12) into [0, 6)."""
    value = jnp.where(value < 0.0, value + 6.0, value)
    return jnp.where(value >= 6.0, value - 6.0, value)
