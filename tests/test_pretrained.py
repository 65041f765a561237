"""Tests for loading torchvision-named ResNet weights into IHCC variables.

The fake state dicts follow the torchvision ResNet-18 layout written out below, independently of
ihcc.pretrained's key list. The reference forward pass runs in NumPy on torch's layouts:
[N, C, H, W] activations and [out, in, kh, kw] conv weights.
"""

import jax
import numpy as np
import pytest
import safetensors.numpy
from numpy.lib.stride_tricks import sliding_window_view

from ihcc import models
from ihcc.pretrained import load_torchvision_resnet

IMAGE_SIZE = 32


def _bn_shapes(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    entries = ("weight", "bias", "running_mean", "running_var")
    return {f"{prefix}.{entry}": (channels,) for entry in entries}


def _torchvision_resnet18_shapes() -> dict[str, tuple[int, ...]]:
    """Return torchvision resnet18().state_dict() key -> shape, without the int counters."""
    shapes = {"conv1.weight": (64, 3, 7, 7)}
    shapes.update(_bn_shapes("bn1", 64))
    in_channels = 64
    for stage, width in enumerate((64, 128, 256, 512), start=1):
        for index in range(2):
            block = f"layer{stage}.{index}"
            shapes[f"{block}.conv1.weight"] = (width, in_channels, 3, 3)
            shapes.update(_bn_shapes(f"{block}.bn1", width))
            shapes[f"{block}.conv2.weight"] = (width, width, 3, 3)
            shapes.update(_bn_shapes(f"{block}.bn2", width))
            if index == 0 and stage > 1:
                shapes[f"{block}.downsample.0.weight"] = (width, in_channels, 1, 1)
                shapes.update(_bn_shapes(f"{block}.downsample.1", width))
            in_channels = width
    shapes["fc.weight"] = (1000, 512)
    shapes["fc.bias"] = (1000,)
    return shapes


def _fake_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in _torchvision_resnet18_shapes().items():
        if key.endswith("running_var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        else:
            value = rng.uniform(-0.3, 0.3, shape) + (1.0 if key.endswith(".weight") else 0.0)
        state[key] = value.astype(np.float32)
    # torchvision also stores an int64 counter per BatchNorm; the loader must skip it.
    for key in list(state):
        if key.endswith("running_mean"):
            state[key.replace("running_mean", "num_batches_tracked")] = np.array(7, np.int64)
    return state


def _write(state: dict[str, np.ndarray], path: str) -> str:
    if path.endswith(".safetensors"):
        safetensors.numpy.save_file(state, path)
    else:
        np.savez(path, **state)
    return path


@pytest.fixture(scope="module")
def model():
    return models.IHCC(depth=18, feature_dim=8, class_num=6, num_participants=2)


@pytest.fixture(scope="module")
def variables(model):
    # Random values in the shapes that model.init returns. The loader only reads shapes and
    # dtypes, and compiling model.init takes longer than all tests in this file together.
    x = np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    rng = np.random.default_rng(3)
    return jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), shapes)


@pytest.fixture(scope="module")
def state():
    return _fake_state_dict()


# NumPy reference of torchvision's ResNet-18 in eval mode, on NCHW arrays in float64.

def _np_conv(x, weight, stride, pad):
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = weight.shape[2:]
    windows = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    return np.einsum("bchwij,ocij->bohw", windows, weight.astype(np.float64))


def _np_bn(x, state, prefix):
    scale = state[f"{prefix}.weight"] / np.sqrt(state[f"{prefix}.running_var"] + 1e-5)
    shift = state[f"{prefix}.bias"] - state[f"{prefix}.running_mean"] * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def _np_maxpool(x):
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    return sliding_window_view(x, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max(axis=(-2, -1))


def _np_relu(x):
    return np.maximum(x, 0.0)


def _np_resnet18(images_nhwc, state):
    mean = np.asarray(models.IMAGENET_MEAN)
    std = np.asarray(models.IMAGENET_STD)
    x = ((images_nhwc.astype(np.float64) - mean) / std).transpose(0, 3, 1, 2)
    x = _np_relu(_np_bn(_np_conv(x, state["conv1.weight"], 2, 3), state, "bn1"))
    x = _np_maxpool(x)
    for stage in range(1, 5):
        for index in range(2):
            block = f"layer{stage}.{index}"
            stride = 2 if stage > 1 and index == 0 else 1
            out = _np_conv(x, state[f"{block}.conv1.weight"], stride, 1)
            out = _np_relu(_np_bn(out, state, f"{block}.bn1"))
            out = _np_conv(out, state[f"{block}.conv2.weight"], 1, 1)
            out = _np_bn(out, state, f"{block}.bn2")
            shortcut = x
            if f"{block}.downsample.0.weight" in state:
                shortcut = _np_conv(x, state[f"{block}.downsample.0.weight"], stride, 0)
                shortcut = _np_bn(shortcut, state, f"{block}.downsample.1")
            x = _np_relu(out + shortcut)
    return x.mean(axis=(2, 3))


@pytest.mark.parametrize("extension", [".safetensors", ".npz"])
def test_load_replaces_every_backbone_variable(tmp_path, variables, state, extension):
    path = _write(state, str(tmp_path / f"resnet18{extension}"))
    stem_before = np.array(variables["params"]["backbone"]["conv1"]["kernel"])
    loaded = load_torchvision_resnet(path, variables, depth=18)

    backbone_leaves = (jax.tree.leaves(loaded["params"]["backbone"])
                       + jax.tree.leaves(loaded["batch_stats"]["backbone"]))
    loaded_values = {np.asarray(leaf).tobytes() for leaf in backbone_leaves}
    torch_values = set()
    for key, value in state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        torch_values.add(np.ascontiguousarray(value).tobytes())
    # Every backbone variable now contains one of the file's tensors, and every tensor was used.
    assert len(backbone_leaves) == len(torch_values)
    assert loaded_values == torch_values

    for head in ("instance_head", "cluster_head", "participant_head"):
        for before, after in zip(jax.tree.leaves(variables["params"][head]),
                                 jax.tree.leaves(loaded["params"][head])):
            np.testing.assert_array_equal(before, after)
    # The loader returns a copy and leaves the input variables as they were.
    np.testing.assert_array_equal(variables["params"]["backbone"]["conv1"]["kernel"],
                                  stem_before)
    assert not np.array_equal(loaded["params"]["backbone"]["conv1"]["kernel"], stem_before)


def test_bn_entries_map_to_flax_names(tmp_path, variables, state):
    loaded = load_torchvision_resnet(_write(state, str(tmp_path / "r.npz")), variables, depth=18)
    bn = loaded["params"]["backbone"]["layer3_0"]["downsample_bn"]
    stats = loaded["batch_stats"]["backbone"]["layer3_0"]["downsample_bn"]
    np.testing.assert_array_equal(bn["scale"], state["layer3.0.downsample.1.weight"])
    np.testing.assert_array_equal(bn["bias"], state["layer3.0.downsample.1.bias"])
    np.testing.assert_array_equal(stats["mean"], state["layer3.0.downsample.1.running_mean"])
    np.testing.assert_array_equal(stats["var"], state["layer3.0.downsample.1.running_var"])


def test_stem_conv_matches_torch_layout_reference(tmp_path, variables, state):
    loaded = load_torchvision_resnet(_write(state, str(tmp_path / "r.safetensors")), variables,
                                     depth=18)
    x = np.random.default_rng(1).uniform(size=(2, 16, 16, 3)).astype(np.float32)
    stem = models.Conv(64, (7, 7), (2, 2), ((3, 3), (3, 3)))
    output = stem.apply({"params": loaded["params"]["backbone"]["conv1"]}, x)

    reference = _np_conv(x.transpose(0, 3, 1, 2).astype(np.float64), state["conv1.weight"], 2, 3)
    np.testing.assert_allclose(output, reference.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)


def test_loaded_model_matches_numpy_resnet18(tmp_path, model, variables, state):
    loaded = load_torchvision_resnet(_write(state, str(tmp_path / "r.safetensors")), variables,
                                     depth=18)
    images = np.random.default_rng(2).uniform(size=(2, IMAGE_SIZE, IMAGE_SIZE, 3))
    images = images.astype(np.float32)
    features = jax.jit(lambda v, x: model.apply(v, x, train=False)["features"])(loaded, images)

    reference = _np_resnet18(images, state)
    np.testing.assert_allclose(features, reference, rtol=1e-4, atol=1e-4)


def test_missing_file_raises(tmp_path, variables):
    path = str(tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="not found") as error:
        load_torchvision_resnet(path, variables, depth=18)
    assert path in str(error.value)


def test_unknown_extension_raises(tmp_path, variables):
    path = str(tmp_path / "weights.pth")
    with open(path, "wb") as handle:
        handle.write(b"\0" * 16)
    with pytest.raises(ValueError, match=r"unsupported extension '\.pth'") as error:
        load_torchvision_resnet(path, variables, depth=18)
    assert path in str(error.value)


def test_corrupt_file_raises(tmp_path, variables):
    for name in ("bad.safetensors", "bad.npz"):
        path = str(tmp_path / name)
        with open(path, "wb") as handle:
            handle.write(b"not a weights file")
        with pytest.raises(ValueError, match="Failed to read") as error:
            load_torchvision_resnet(path, variables, depth=18)
        assert path in str(error.value)


def test_missing_key_raises(tmp_path, variables, state):
    partial = {k: v for k, v in state.items() if k != "layer2.0.downsample.1.running_var"}
    path = _write(partial, str(tmp_path / "partial.npz"))
    with pytest.raises(ValueError) as error:
        load_torchvision_resnet(path, variables, depth=18)
    message = str(error.value)
    assert path in message
    assert "'layer2.0.downsample.1.running_var'" in message
    assert "(128,)" in message


def test_shape_mismatch_raises(tmp_path, variables, state):
    wrong = dict(state)
    wrong["layer3.1.conv2.weight"] = np.zeros((256, 256, 1, 1), np.float32)
    path = _write(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError) as error:
        load_torchvision_resnet(path, variables, depth=18)
    message = str(error.value)
    assert path in message
    assert "'layer3.1.conv2.weight'" in message
    assert "(256, 256, 3, 3)" in message
    assert "(256, 256, 1, 1)" in message


def test_extra_backbone_keys_raise(tmp_path, variables, state):
    # A ResNet-34 file has layer1.2 and more; loading it as depth 18 must not pass silently.
    extra = dict(state)
    extra["layer1.2.conv1.weight"] = np.zeros((64, 64, 3, 3), np.float32)
    path = _write(extra, str(tmp_path / "r34.npz"))
    with pytest.raises(ValueError, match="layer1.2.conv1.weight") as error:
        load_torchvision_resnet(path, variables, depth=18)
    assert path in str(error.value)


def test_depth_mismatch_with_variables_raises(tmp_path, variables, state):
    path = _write(state, str(tmp_path / "r.npz"))
    with pytest.raises(ValueError, match=r"IHCC\(depth=34\)"):
        load_torchvision_resnet(path, variables, depth=34)
    with pytest.raises(ValueError, match="depth 101"):
        load_torchvision_resnet(path, variables, depth=101)


def test_params_only_dict_raises(tmp_path, variables, state):
    path = _write(state, str(tmp_path / "r.npz"))
    with pytest.raises(ValueError, match="batch_stats"):
        load_torchvision_resnet(path, {"params": variables["params"]}, depth=18)


def test_config_pretrained_path_initialises_train_state(tmp_path, state):
    from conftest import tiny_config
    from ihcc import train

    config = tiny_config()
    config.model.pretrained = _write(state, str(tmp_path / "resnet18.safetensors"))
    train_state = train.create_train_state(jax.random.key(0), config, 2, steps_per_epoch=1)

    backbone = train_state.params["backbone"]
    np.testing.assert_array_equal(
        backbone["conv1"]["kernel"], state["conv1.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        train_state.batch_stats["backbone"]["bn1"]["mean"], state["bn1.running_mean"]
    )
