"""Resolve the configured input, decode it once into the cache, and serve training batches."""

import dataclasses
import hashlib
import os

import ml_collections
import numpy as np
from absl import logging

from ihcc import cache as cache_lib
from ihcc import inputs
from ihcc import synthetic


def resolve_input(
    data_config: ml_collections.ConfigDict, workdir: str, root: str = "", manifest: str = ""
) -> tuple[str, str]:
    """Return the (root, manifest) to read, generating the synthetic cohort when enabled.

    `root` and `manifest` override the ones in `data_config` when either is given.
    """
    if root or manifest:
        return root, manifest
    if data_config.synthetic.enabled:
        synth = data_config.synthetic
        out_dir = os.path.join(workdir, "synthetic")
        manifest = synthetic.make_cohort(
            out_dir,
            num_participants=synth.num_participants,
            num_types=synth.num_types,
            envs_per_participant=synth.envs_per_participant,
            photos_per_env=synth.photos_per_env,
            image_size=data_config.image_size,
            seed=synth.seed,
        )
        return os.path.join(out_dir, "images"), manifest
    if not data_config.root and not data_config.manifest:
        raise inputs.InputError(
            "No input is configured: set --config.data.root to a photo folder, "
            "--config.data.manifest to a CSV manifest, or enable data.synthetic."
        )
    return data_config.root, data_config.manifest


def cache_dir_for(workdir: str, root: str, manifest: str) -> str:
    """Return the cache folder for one input; each input gets its own."""
    key = f"{os.path.abspath(root) if root else ''}|{os.path.abspath(manifest) if manifest else ''}"
    digest = hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return os.path.join(workdir, "cache", digest)


def load_images(workdir: str, root: str, manifest: str, image_size: int) -> cache_lib.CachedImages:
    """Discover the input's images and decode them into (or reuse) the workdir cache."""
    inventory = inputs.discover(root=root, manifest=manifest)
    images = cache_lib.build_cache(inventory, cache_dir_for(workdir, root, manifest), image_size)
    logging.info(
        "Input %s: %d usable images, %d skipped.",
        manifest or root,
        len(images),
        len(images.skipped),
    )
    if not len(images):
        raise inputs.InputError(
            f"No readable image in {manifest or root}: all {len(images.skipped)} files were "
            "skipped (run --mode=check for the reasons)."
        )
    return images


@dataclasses.dataclass
class TrainingData:
    """Cached training images with integer participant labels."""

    images: cache_lib.CachedImages
    participants: list[str]  # Participant id of each participant-head class.
    participant_labels: np.ndarray  # int32, one per cached image.

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images.get_batch(indices), self.participant_labels[indices]


def prepare_training_data(config: ml_collections.ConfigDict, workdir: str) -> TrainingData:
    root, manifest = resolve_input(config.data, workdir)
    images = load_images(workdir, root, manifest, config.data.image_size)
    participants = sorted({r.participant for r in images.records})
    index = {p: i for i, p in enumerate(participants)}
    labels = np.asarray([index[r.participant] for r in images.records], np.int32)
    return TrainingData(images=images, participants=participants, participant_labels=labels)
