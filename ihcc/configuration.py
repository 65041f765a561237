"""Checks of a run configuration that can fail before any image is read or compiled."""

import json
import os

import ml_collections

from ihcc import models


class ConfigError(ValueError):
    """A configuration value that is invalid, or that does not fit the existing workdir."""


_CHOICES = {
    ("prior", "kind"): ("gem", "dp", "reference", "none"),
    ("loss", "participant_form"): ("cross_entropy", "reference"),
    ("assign", "type_feature"): ("backbone", "instance"),
}

# Fields that fix the shapes of the checkpoint or of the cached images.
_WORKDIR_FIELDS = (
    ("model", "depth"),
    ("model", "feature_dim"),
    ("model", "class_num"),
    ("model", "participant_head"),
    ("data", "image_size"),
)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming the first invalid field and its valid values."""
    for (group, field), choices in _CHOICES.items():
        value = config[group][field]
        if value not in choices:
            raise ConfigError(
                f"Invalid {group}.{field}={value!r}; use one of {', '.join(map(repr, choices))}."
            )
    depths = tuple(models.RESNET_STAGES)
    if config.model.depth not in depths:
        raise ConfigError(
            f"Invalid model.depth={config.model.depth}; use one of {', '.join(map(str, depths))}."
        )
    positive = (
        ("data", "image_size"),
        ("model", "feature_dim"),
        ("model", "class_num"),
        ("train", "batch_size"),
        ("train", "num_epochs"),
        ("train", "log_every_steps"),
        ("train", "checkpoint_every_epochs"),
        ("train", "keep_checkpoints"),
        ("optim", "step_size"),
        ("assign", "batch_size"),
    )
    for group, field in positive:
        if config[group][field] < 1:
            raise ConfigError(f"Invalid {group}.{field}={config[group][field]}; it must be >= 1.")
    if config.model.class_num < 2:
        raise ConfigError(f"Invalid model.class_num={config.model.class_num}; K must be >= 2.")
    if not 0.0 <= config.prior.ema_momentum < 1.0:
        raise ConfigError(
            f"Invalid prior.ema_momentum={config.prior.ema_momentum}; it must lie in [0, 1)."
        )
    if config.prior.alpha <= 0:
        raise ConfigError(f"Invalid prior.alpha={config.prior.alpha}; it must be > 0.")
    for field in ("kappa", "warmup_fraction", "ramp_fraction", "entropy_scale_end"):
        if config.prior[field] < 0:
            raise ConfigError(f"Invalid prior.{field}={config.prior[field]}; it must be >= 0.")
    if config.prior.warmup_fraction + config.prior.ramp_fraction > 1.0:
        raise ConfigError(
            f"Invalid prior.warmup_fraction={config.prior.warmup_fraction} with "
            f"prior.ramp_fraction={config.prior.ramp_fraction}: together they are shares of "
            "the training steps and must not exceed 1."
        )
    if not -1.0 <= config.assign.type_threshold <= 1.0:
        raise ConfigError(
            f"Invalid assign.type_threshold={config.assign.type_threshold}; a cosine similarity "
            "lies in [-1, 1]."
        )
    if config.data.synthetic.enabled and (config.data.root or config.data.manifest):
        raise ConfigError(
            "data.root or data.manifest is set while data.synthetic.enabled=True, which would "
            "train on the generated cohort instead; add --config.data.synthetic.enabled=False."
        )


# Groups and fields that define the training objective and its data order. A run resumed
# with other values would mix two objectives, and its config.json would name only the second.
_TRAINING_GROUPS = ("loss", "prior", "augment", "optim")
_TRAINING_FIELDS = (("train", "batch_size"),)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_workdir(config: ml_collections.ConfigDict, workdir: str, training: bool = False) -> None:
    """Raise ConfigError if `workdir` contains a run that `config` does not fit.

    The model and image size must always match. With training=True (train or resume), the
    seed, the loss, prior, augmentation and optimiser settings and the batch size must match
    too; train.num_epochs may change, which stretches or shortens the prior's schedule.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(
            f"--workdir={workdir} is a file; give a folder (it is created if missing)."
        )
    saved_path = os.path.join(workdir, "config.json")
    if not os.path.exists(os.path.join(workdir, "checkpoints")) or not os.path.exists(saved_path):
        return
    with open(saved_path, encoding="utf-8") as f:
        saved = json.load(f)
    for group, field in _WORKDIR_FIELDS:
        before = saved.get(group, {}).get(field)
        now = config[group][field]
        if before is not None and before != now:
            raise ConfigError(
                f"{workdir} contains a run trained with {group}.{field}={before!r}, but the config "
                f"sets {now!r}; use a new --workdir, or keep {group}.{field}={before!r}."
            )
    if not training:
        return
    saved_flat = _flatten(saved)
    current_flat = _flatten(config.to_dict())
    names = ["seed"] + [f"{group}.{field}" for group, field in _TRAINING_FIELDS]
    names += sorted(
        name
        for name in set(saved_flat) | set(current_flat)
        if name.split(".", 1)[0] in _TRAINING_GROUPS
    )
    for name in names:
        before, now = saved_flat.get(name), current_flat.get(name)
        if name in saved_flat and before != now:
            raise ConfigError(
                f"{workdir} contains a run trained with {name}={before!r}, but the config sets "
                f"{now!r}, so resuming would mix two training setups; use a new --workdir, or "
                f"keep {name}={before!r}."
            )
