"""Load torchvision ResNet weights from a local file into IHCC variables.

The file is a .safetensors or .npz file whose keys are torchvision ResNet state-dict names
(conv1.weight, bn1.running_mean, layer1.0.conv1.weight, layer2.0.downsample.0.weight, ...).
Only the backbone is replaced. The fc.* entries and BatchNorm num_batches_tracked counters are
ignored, and the IH-CC heads keep their values. Nothing is downloaded: convert or fetch the
file beforehand, for example by saving torchvision.models.resnet18(weights=...).state_dict()
with safetensors.torch.save_file.
"""

import os
from typing import Iterator

import flax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from ihcc import models

BACKBONE = "backbone"
SUPPORTED_EXTENSIONS = (".safetensors", ".npz")

# Flax BatchNorm variable for each torchvision BatchNorm2d entry: (collection, name).
_BATCH_NORM_ENTRIES = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}


def _torch_module_names(depth: int) -> Iterator[tuple[str, str, str]]:
    """Yield (torch module name, Flax module path, kind) for every conv and BN in the backbone.

    Kind is "conv" or "bn". The Flax path is relative to params["backbone"], with "/" between
    nested module names.
    """
    block_type, blocks_per_stage = models.RESNET_STAGES[depth]
    convs_per_block = 3 if block_type == "bottleneck" else 2

    yield "conv1", "conv1", "conv"
    yield "bn1", "bn1", "bn"
    for stage, num_blocks in enumerate(blocks_per_stage, start=1):
        for index in range(num_blocks):
            torch_block = f"layer{stage}.{index}"
            flax_block = f"layer{stage}_{index}"
            for conv in range(1, convs_per_block + 1):
                yield f"{torch_block}.conv{conv}", f"{flax_block}/conv{conv}", "conv"
                yield f"{torch_block}.bn{conv}", f"{flax_block}/bn{conv}", "bn"
            # torchvision gives a block a projection shortcut when its stride or width changes.
            # In these layouts that is block 0 of every stage, except layer1 of ResNet-18/34.
            if index == 0 and (stage > 1 or block_type == "bottleneck"):
                yield f"{torch_block}.downsample.0", f"{flax_block}/downsample_conv", "conv"
                yield f"{torch_block}.downsample.1", f"{flax_block}/downsample_bn", "bn"


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise ValueError(
            f"Pretrained weights file {path!r} not found; pass the path of a local "
            f".safetensors or .npz file with torchvision ResNet keys."
        )
    extension = os.path.splitext(path)[1].lower()
    if extension not in SUPPORTED_EXTENSIONS:
        raise ValueError(
            f"Pretrained weights file {path!r} has unsupported extension {extension!r}; "
            f"use one of {', '.join(SUPPORTED_EXTENSIONS)}."
        )

    try:
        if extension == ".safetensors":
            return dict(safetensors.numpy.load_file(path))
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, safetensors.SafetensorError) as error:
        raise ValueError(f"Failed to read pretrained weights file {path!r}: {error}") from error


def _get_node(tree: dict, collection: str, module_path: str, path: str, depth: int) -> dict:
    node = tree.get(collection, {}).get(BACKBONE)
    for name in module_path.split("/"):
        if not isinstance(node, dict) or name not in node:
            raise ValueError(
                f"IHCC variables have no {collection}/{BACKBONE}/{module_path} needed by a "
                f"ResNet-{depth}; the variables do not come from IHCC(depth={depth}), so "
                f"{path!r} cannot be loaded into them."
            )
        node = node[name]
    return node


def _take(state: dict[str, np.ndarray], key: str, expected_shape: tuple[int, ...], path: str,
          depth: int) -> np.ndarray:
    if key not in state:
        raise ValueError(
            f"Pretrained weights file {path!r} has no key {key!r} (expected shape "
            f"{expected_shape}) for a torchvision ResNet-{depth}; check the file and --depth."
        )
    value = np.asarray(state.pop(key))
    if value.shape != expected_shape:
        raise ValueError(
            f"Pretrained weights file {path!r}: key {key!r} has shape {value.shape}, expected "
            f"{expected_shape} for a torchvision ResNet-{depth}; check the file and --depth."
        )
    if not np.issubdtype(value.dtype, np.floating):
        raise ValueError(
            f"Pretrained weights file {path!r}: key {key!r} has dtype {value.dtype}, expected "
            f"a floating-point array."
        )
    return value


def load_torchvision_resnet(path: str, variables: dict, depth: int) -> dict:
    """Return a copy of IHCC `variables` with the backbone replaced by torchvision weights.

    Conv weights are transposed from torch's [out, in, kh, kw] to Flax's [kh, kw, in, out].
    BatchNorm weight/bias go to params scale/bias, and running_mean/running_var go to
    batch_stats mean/var. Each value is cast to the dtype of the variable it replaces.

    Raises ValueError when the file is missing, has an extension other than .safetensors or
    .npz, cannot be read, lacks a key or has a key of the wrong shape or dtype. It also raises
    when the file has backbone keys that a ResNet of this depth does not use, which points to a
    file for another depth. The message names the file, and the key and expected shape where
    one applies. ValueError is
    also raised when `variables` do not come from IHCC(depth=depth).init.
    """
    if depth not in models.RESNET_STAGES:
        raise ValueError(
            f"Unsupported ResNet depth {depth!r}; use one of {sorted(models.RESNET_STAGES)}."
        )
    state = _read_state_dict(path)
    loaded = flax.core.unfreeze(variables)
    for collection in ("params", "batch_stats"):
        if BACKBONE not in loaded.get(collection, {}):
            raise ValueError(
                f"IHCC variables have no {collection}/{BACKBONE}; pass the dict returned by "
                f"IHCC(depth={depth}).init, not only its params."
            )

    for torch_name, flax_path, kind in _torch_module_names(depth):
        if kind == "conv":
            node = _get_node(loaded, "params", flax_path, path, depth)
            kh, kw, in_channels, out_channels = node["kernel"].shape
            weight = _take(state, f"{torch_name}.weight", (out_channels, in_channels, kh, kw),
                           path, depth)
            kernel = np.transpose(weight, (2, 3, 1, 0))
            node["kernel"] = jnp.asarray(kernel, node["kernel"].dtype)
            continue

        for torch_entry, (collection, flax_name) in _BATCH_NORM_ENTRIES.items():
            node = _get_node(loaded, collection, flax_path, path, depth)
            target = node[flax_name]
            value = _take(state, f"{torch_name}.{torch_entry}", tuple(target.shape), path, depth)
            node[flax_name] = jnp.asarray(value, target.dtype)
        state.pop(f"{torch_name}.num_batches_tracked", None)

    unused = sorted(key for key in state if not key.startswith("fc."))
    if unused:
        listed = ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else "")
        raise ValueError(
            f"Pretrained weights file {path!r} has {len(unused)} keys that a torchvision "
            f"ResNet-{depth} does not use ({listed}); check that the file is for depth {depth}."
        )
    return loaded
