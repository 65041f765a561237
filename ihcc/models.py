"""ResNet backbones and the IH-CC heads in Flax linen.

The backbones follow the torchvision ResNet layout, v1.5, where a bottleneck block puts its
stride on the 3x3 convolution. Every torchvision parameter therefore maps to exactly one Flax
parameter (see ihcc.pretrained). Module names mirror the torchvision attribute names:
backbone/conv1, backbone/bn1, backbone/layer1_0/conv1, backbone/layer1_0/downsample_conv, ...

BatchNorm uses torchvision's defaults (momentum 0.1 in torch convention, which is 0.9 in Flax
convention, and epsilon 1e-5). In train mode it normalises with the statistics of the whole
batch it is given. Under jax.jit with the batch sharded over a device mesh that batch is the
global batch, so no axis_name is needed.

NOTE: Flax updates the running variance with the biased batch variance, while torch uses the
unbiased one. With n = batch * height * width values per channel, the running variance thus
settles at (n - 1) / n times torch's. That is 0.1% low for a 256-image batch on the 2x2
layer4 map of 64 px inputs, and more for smaller batches or maps.
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# ImageNet channel statistics used by torchvision's pretrained ResNets, for RGB in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# Stage layout per depth: (block type, blocks per stage). Stage widths are 64, 128, 256, 512
# and a bottleneck block expands its output 4x.
RESNET_STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}
STAGE_WIDTHS = (64, 128, 256, 512)
BOTTLENECK_EXPANSION = 4

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", nonlinearity="relu"),
# a plain (untruncated) normal with variance 2 / fan_out.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def representation_dim(depth: int) -> int:
    """Return the width of the pooled backbone output for a supported ResNet depth."""
    block, _ = _stage_layout(depth)
    expansion = BOTTLENECK_EXPANSION if block == "bottleneck" else 1
    return STAGE_WIDTHS[-1] * expansion


def _stage_layout(depth: int) -> tuple[str, tuple[int, ...]]:
    if depth not in RESNET_STAGES:
        raise ValueError(
            f"Unsupported ResNet depth {depth!r}; use one of {sorted(RESNET_STAGES)}."
        )
    return RESNET_STAGES[depth]


def _extract_patches(x: jax.Array, kernel_size: tuple[int, int], strides: tuple[int, int],
                     padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """Gather conv input patches [B, H', W', kh * kw * C] with plain pads and strided slices.

    The last axis is ordered (kernel row, kernel column, channel), which matches a kernel of
    shape [kh, kw, C, out] reshaped to [kh * kw * C, out].
    """
    kh, kw = kernel_size
    sh, sw = strides
    x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    out_h = (x.shape[1] - kh) // sh + 1
    out_w = (x.shape[2] - kw) // sw + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"Convolution input {tuple(x.shape)} (after padding) is smaller than kernel "
            f"{kernel_size}; use a larger image size."
        )
    windows = []
    for i in range(kh):
        for j in range(kw):
            windows.append(x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :])
    patches = jnp.stack(windows, axis=3)
    return patches.reshape(x.shape[0], out_h, out_w, kh * kw * x.shape[3])


class Conv(nn.Module):
    """2-D convolution without bias, NHWC input, kernel [kh, kw, in, out] named "kernel".

    The parameter name and shape match nn.Conv(use_bias=False). When the unpadded input map is
    smaller than the kernel in either spatial dimension (and im2col_small_maps is set), the
    convolution runs as im2col plus one matmul. On CPU with jax 0.10.2, XLA runs such
    convolutions on a slow scalar kernel. An example is layer4 of a ResNet at 64 px input, a
    2x2 map under a 3x3 kernel. With experiments/bench_step.py (ResNet-18, 64 px, batch 64,
    2 busy CPU cores) the train step ran at 7.4 images/s without im2col and 25 with it.
    Both paths compute the same function. Shapes are static under jit, so the choice is made
    once per trace.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    im2col_small_maps: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = conv_kernel_init

    def uses_im2col(self, input_shape: Sequence[int]) -> bool:
        """Return whether an NHWC input of this shape takes the im2col path."""
        height, width = input_shape[1], input_shape[2]
        return self.im2col_small_maps and (
            height < self.kernel_size[0] or width < self.kernel_size[1]
        )

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel_shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)

        if self.uses_im2col(x.shape):
            patches = _extract_patches(x, self.kernel_size, self.strides, self.padding)
            return patches @ kernel.reshape(-1, self.features)
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=self.strides,
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


def _conv(features: int, kernel: int, stride: int, im2col_small_maps: bool, dtype: Any,
          name: str) -> Conv:
    """Return a square convolution padded by kernel // 2, as torchvision pads its ResNet convs."""
    pad = kernel // 2
    return Conv(
        features,
        (kernel, kernel),
        (stride, stride),
        ((pad, pad), (pad, pad)),
        im2col_small_maps=im2col_small_maps,
        dtype=dtype,
        name=name,
    )


def _batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        name=name,
    )


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3x3 convolutions and an identity or 1x1 projection shortcut."""

    width: int
    stride: int = 1
    im2col_small_maps: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        def conv(features, kernel, stride, name):
            return _conv(features, kernel, stride, self.im2col_small_maps, self.dtype, name)


        out = conv(self.width, 3, self.stride, "conv1")(x)
        out = nn.relu(_batch_norm(train, self.dtype, "bn1")(out))
        out = conv(self.width, 3, 1, "conv2")(out)
        out = _batch_norm(train, self.dtype, "bn2")(out)

        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.width:
            shortcut = conv(self.width, 1, self.stride, "downsample_conv")(x)
            shortcut = _batch_norm(train, self.dtype, "downsample_bn")(shortcut)
        return nn.relu(out + shortcut)


class Bottleneck(nn.Module):
    """ResNet-50 block: 1x1 reduce, 3x3 (carrying the stride, as torchvision v1.5), 1x1 expand."""

    width: int
    stride: int = 1
    im2col_small_maps: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        def conv(features, kernel, stride, name):
            return _conv(features, kernel, stride, self.im2col_small_maps, self.dtype, name)

        out_width = self.width * BOTTLENECK_EXPANSION

        out = conv(self.width, 1, 1, "conv1")(x)
        out = nn.relu(_batch_norm(train, self.dtype, "bn1")(out))
        out = conv(self.width, 3, self.stride, "conv2")(out)
        out = nn.relu(_batch_norm(train, self.dtype, "bn2")(out))
        out = conv(out_width, 1, 1, "conv3")(out)
        out = _batch_norm(train, self.dtype, "bn3")(out)

        shortcut = x
        if self.stride != 1 or x.shape[-1] != out_width:
            shortcut = conv(out_width, 1, self.stride, "downsample_conv")(x)
            shortcut = _batch_norm(train, self.dtype, "downsample_bn")(shortcut)
        return nn.relu(out + shortcut)


class ResNet(nn.Module):
    """torchvision-layout ResNet without the fc layer; returns the pooled features [B, C].

    The last BatchNorm of each block starts with scale 1, as torchvision's default
    (zero_init_residual=False).
    """

    depth: int = 18
    im2col_small_maps: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        block_type, blocks_per_stage = _stage_layout(self.depth)
        block_class = Bottleneck if block_type == "bottleneck" else BasicBlock

        x = _conv(64, 7, 2, self.im2col_small_maps, self.dtype, "conv1")(x)
        x = nn.relu(_batch_norm(train, self.dtype, "bn1")(x))
        # nn.max_pool pads with -inf, like torch.nn.MaxPool2d(3, 2, padding=1).
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        for stage, (width, num_blocks) in enumerate(zip(STAGE_WIDTHS, blocks_per_stage)):
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                x = block_class(
                    width,
                    stride,
                    im2col_small_maps=self.im2col_small_maps,
                    dtype=self.dtype,
                    name=f"layer{stage + 1}_{index}",
                )(x, train)

        return jnp.mean(x, axis=(1, 2))


def _torch_linear_bias_init(fan_in: int) -> Callable:
    """Return torch.nn.Linear's default bias init: uniform in [-1/sqrt(fan_in), 1/sqrt(fan_in)]."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# torch.nn.Linear's default weight init (kaiming_uniform_ with a=sqrt(5)) is uniform in
# [-1/sqrt(fan_in), 1/sqrt(fan_in)], which is variance scaling 1/3 with a uniform distribution.
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class ProjectionHead(nn.Module):
    """Dense(hidden) - ReLU - Dense(out), initialised like torch.nn.Linear."""

    hidden: int
    out: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=torch_linear_kernel_init,
                     bias_init=_torch_linear_bias_init(x.shape[-1]), name="hidden")(x)
        x = nn.relu(x)
        return nn.Dense(self.out, dtype=self.dtype, kernel_init=torch_linear_kernel_init,
                        bias_init=_torch_linear_bias_init(self.hidden), name="output")(x)


class IHCC(nn.Module):
    """ResNet backbone with instance, cluster and optional participant heads.

    Input: float32 [B, H, W, 3] RGB in [0, 1]; the model applies the ImageNet mean/std itself.
    Output dict, all float32:
      "features": pooled backbone output [B, rep_dim] (512 for depth 18/34, 2048 for 50);
      "z": instance embedding [B, feature_dim], L2-normalised;
      "cluster_logits": [B, class_num], before softmax;
      "participant_logits": [B, num_participants], only when num_participants > 0.
    Variables: "params" and "batch_stats". Call with train=True and mutable=["batch_stats"]
    to update the BatchNorm running statistics.
    """

    depth: int = 18
    feature_dim: int = 128
    class_num: int = 150
    num_participants: int = 0
    dtype: Any = jnp.float32
    # Run convolutions on maps smaller than their kernel as im2col + matmul; see Conv.
    im2col_small_maps: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> dict:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"IHCC expects images [B, H, W, 3]; got shape {tuple(x.shape)}.")
        if self.num_participants < 0:
            raise ValueError(
                f"num_participants must be >= 0 (0 disables the participant head); "
                f"got {self.num_participants}."
            )

        mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
        std = jnp.asarray(IMAGENET_STD, jnp.float32)
        x = (x.astype(jnp.float32) - mean) / std

        features = ResNet(self.depth, im2col_small_maps=self.im2col_small_maps,
                          dtype=self.dtype, name="backbone")(x, train)
        rep_dim = features.shape[-1]

        z = ProjectionHead(rep_dim, self.feature_dim, dtype=self.dtype,
                           name="instance_head")(features).astype(jnp.float32)
        # Divide by max(norm, 1e-12) like torch.nn.functional.normalize. Clamping the squared
        # norm instead of the norm keeps the gradient finite for an all-zero vector.
        squared_norm = jnp.sum(jnp.square(z), axis=-1, keepdims=True)
        z = z * jax.lax.rsqrt(jnp.maximum(squared_norm, 1e-24))
        cluster_logits = ProjectionHead(rep_dim, self.class_num, dtype=self.dtype,
                                        name="cluster_head")(features)
        outputs = {
            "features": features.astype(jnp.float32),
            "z": z,
            "cluster_logits": cluster_logits.astype(jnp.float32),
        }
        if self.num_participants > 0:
            participant_logits = ProjectionHead(rep_dim, self.num_participants, dtype=self.dtype,
                                                name="participant_head")(features)
            outputs["participant_logits"] = participant_logits.astype(jnp.float32)
        return outputs
