"""The assign step: label every image with participant, personal environment and type.

Personal environments are (participant, cluster) pairs. Environment types come from
merging personal-environment centroids across participants by average-linkage
agglomerative clustering on cosine distance, stopping at `assign.type_threshold`
cosine similarity.
"""

import collections
import csv
import hashlib
import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from sklearn.cluster import AgglomerativeClustering

from ihcc import augment as augment_lib
from ihcc import data as data_lib
from ihcc import parallel
from ihcc import train as train_lib

ASSIGNMENT_COLUMNS = (
    "path",
    "participant",
    "status",
    "reason",
    "cluster",
    "cluster_probability",
    "environment",
    "environment_type",
    "true_environment",
    "true_environment_type",
)


def assign_dir(workdir: str, config: ml_collections.ConfigDict) -> str:
    """Return the output folder of the assign step for the configured assign input.

    Labels of the training input go to workdir/assign. Each other input (assign.root or
    assign.manifest) gets its own folder, so labelling a new cohort never overwrites earlier
    outputs.
    """
    root, manifest = config.assign.root, config.assign.manifest
    if not root and not manifest:
        return os.path.join(workdir, "assign")
    source = manifest or root.rstrip(os.sep)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(os.path.basename(source))[0])
    digest = hashlib.sha1(
        f"{os.path.abspath(root) if root else ''}|{os.path.abspath(manifest) if manifest else ''}".encode(
            "utf-8", "surrogateescape"
        )
    ).hexdigest()[:8]
    return os.path.join(workdir, f"assign-{name}-{digest}")


def _participant_of_skipped(path: str, root: str) -> str:
    """Return the participant folder of a skipped file under `root`, or "" when unknown."""
    if not root:
        return ""
    relative = os.path.relpath(path, os.path.abspath(root))
    parts = relative.split(os.sep)
    if relative.startswith("..") or len(parts) < 2:
        return ""
    return parts[0]


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str, mesh):
    """Restore the latest checkpoint's model variables; raise if the workdir has none."""
    manager = train_lib.checkpoint_manager(workdir, config)
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(
            f"No checkpoint in {os.path.join(workdir, 'checkpoints')}; run --mode=train with this "
            "--workdir first."
        )
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    state = train_lib.create_train_state(
        jax.random.key(config.seed), config, len(meta["participants"]), meta["steps_per_epoch"]
    )
    state = jax.device_put(state, parallel.replicated(mesh))
    state, _ = train_lib.restore_checkpoint(manager, state, step)
    manager.close()
    logging.info("Restored checkpoint step %d from %s.", step, workdir)
    return state, step


def make_predict_fn(config: ml_collections.ConfigDict, state, mesh):
    """Return a jitted function from uint8 images to (cluster probs, type features)."""

    def predict(variables, images):
        x = augment_lib.preprocess(images, out_size=config.data.image_size)
        outputs = state.apply_fn(variables, x, train=False)
        probs = jax.nn.softmax(outputs["cluster_logits"], axis=-1)
        if config.assign.type_feature == "backbone":
            features = outputs["features"]
        elif config.assign.type_feature == "instance":
            features = outputs["z"]
        else:
            raise ValueError(
                f"Invalid assign.type_feature {config.assign.type_feature!r}; use "
                "'backbone' or 'instance'."
            )
        features = features / jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
        return probs, features

    jitted = jax.jit(
        predict,
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
        out_shardings=parallel.replicated(mesh),
    )
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return lambda images: jitted(variables, images)


def predict_all(images, predict_fn, batch_size: int, mesh) -> tuple[np.ndarray, np.ndarray]:
    """Run `predict_fn` over every cached image in fixed-size, zero-padded batches."""
    num_devices = mesh.devices.size
    batch_size = max(num_devices, batch_size // num_devices * num_devices)
    probs, features = [], []
    for start in range(0, len(images), batch_size):
        indices = np.arange(start, min(start + batch_size, len(images)))
        batch = images.get_batch(indices)
        padded = np.zeros((batch_size,) + batch.shape[1:], batch.dtype)
        padded[: len(indices)] = batch
        local_rows = padded[parallel.process_slice(batch_size)]
        batch_probs, batch_features = jax.device_get(
            predict_fn(parallel.shard_batch(local_rows, mesh))
        )
        probs.append(batch_probs[: len(indices)])
        features.append(batch_features[: len(indices)])
    return np.concatenate(probs), np.concatenate(features)


def environment_types(
    environments: np.ndarray, features: np.ndarray, threshold: float
) -> dict[str, str]:
    """Group personal environments into types by their mean-feature centroids.

    Args:
      environments: personal-environment id of each image.
      features: L2-normalised feature of each image.
      threshold: cosine similarity above which average linkage keeps merging.

    Returns:
      Mapping from environment id to type id; types are numbered by image count, largest first.
    """
    names = sorted(set(environments))
    centroids = np.stack([features[environments == name].mean(axis=0) for name in names])
    if len(names) == 1:
        type_of = np.zeros(1, int)
    else:
        type_of = AgglomerativeClustering(
            n_clusters=None, metric="cosine", linkage="average", distance_threshold=1.0 - threshold
        ).fit_predict(centroids)
    sizes = collections.Counter()
    for name, t in zip(names, type_of):
        sizes[t] += int(np.sum(environments == name))
    rank = {t: i for i, (t, _) in enumerate(sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])))}
    return {name: f"type_{rank[t]:03d}" for name, t in zip(names, type_of)}


def assign(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Label the configured images with the latest checkpoint and write CSV and JSON outputs.

    Returns:
      The summary written to workdir/assign/summary.json.
    """
    mesh = parallel.make_mesh()
    root, manifest = data_lib.resolve_input(
        config.data, workdir, config.assign.root, config.assign.manifest
    )
    images = data_lib.load_images(workdir, root, manifest, config.data.image_size)
    state, step = restore_for_inference(config, workdir, mesh)
    probs, features = predict_all(
        images, make_predict_fn(config, state, mesh), config.assign.batch_size, mesh
    )

    clusters = probs.argmax(axis=-1)
    participants = np.asarray([r.participant for r in images.records], dtype=object)
    environments = np.asarray(
        [f"{p}/c{c:03d}" for p, c in zip(participants, clusters)], dtype=object
    )
    type_of = environment_types(environments, features, config.assign.type_threshold)

    out_dir = assign_dir(workdir, config)
    os.makedirs(out_dir, exist_ok=True)
    stale_evaluation = os.path.join(out_dir, "evaluation.json")
    if os.path.exists(stale_evaluation):
        os.remove(stale_evaluation)
    rows = []
    for i, record in enumerate(images.records):
        rows.append(
            {
                "path": record.path,
                "participant": record.participant,
                "status": "labelled",
                "reason": "",
                "cluster": int(clusters[i]),
                "cluster_probability": f"{probs[i, clusters[i]]:.6f}",
                "environment": environments[i],
                "environment_type": type_of[environments[i]],
                "true_environment": record.environment or "",
                "true_environment_type": record.environment_type or "",
            }
        )
    for skipped in images.skipped:
        rows.append(
            {
                "path": skipped.path,
                "participant": "" if manifest else _participant_of_skipped(skipped.path, root),
                "status": "skipped",
                "reason": skipped.reason,
                "cluster": "",
                "cluster_probability": "",
                "environment": "",
                "environment_type": "",
                "true_environment": "",
                "true_environment_type": "",
            }
        )
    _write_csv(os.path.join(out_dir, "assignments.csv"), rows)
    np.savez(
        os.path.join(out_dir, "features.npz"),
        features=features,
        probs=probs,
        paths=np.asarray([r.path for r in images.records], dtype=str),
    )

    summary = _summarise(config, step, participants, clusters, environments, type_of, images)
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    logging.info(
        "Assigned %d images (%d skipped): %d participants, %d personal environments, "
        "%d environment types, %d of %d clusters occupied. Outputs in %s.",
        summary["images_labelled"],
        summary["images_skipped"],
        summary["participants"],
        summary["environments"],
        summary["environment_types"],
        summary["occupied_clusters"],
        config.model.class_num,
        out_dir,
    )
    return summary


def _write_csv(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.DictWriter(f, fieldnames=ASSIGNMENT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _summarise(config, step, participants, clusters, environments, type_of, images) -> dict:
    per_participant = collections.defaultdict(set)
    for p, e in zip(participants, environments):
        per_participant[p].add(e)
    type_participants = collections.defaultdict(set)
    for p, e in zip(participants, environments):
        type_participants[type_of[e]].add(p)
    # Reasons name their file; counting them with the path replaced groups them by kind.
    skip_reasons = collections.Counter(s.reason.replace(s.path, "<file>") for s in images.skipped)
    return {
        "checkpoint_step": int(step),
        "images_labelled": len(images.records),
        "images_skipped": len(images.skipped),
        "skip_reasons": dict(skip_reasons),
        "participants": len(per_participant),
        "environments": len(set(environments)),
        "environment_types": len(set(type_of.values())),
        "occupied_clusters": int(len(set(clusters.tolist()))),
        "cluster_upper_bound": int(config.model.class_num),
        "type_threshold": float(config.assign.type_threshold),
        "environments_per_participant": {p: len(e) for p, e in sorted(per_participant.items())},
        "participants_per_type": {t: len(p) for t, p in sorted(type_participants.items())},
    }
