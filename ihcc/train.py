"""Training loop: the jitted IH-CC train step, checkpoints, logs and resumption."""

import functools
import json
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import struct
from flax.training import train_state

from ihcc import augment as augment_lib
from ihcc import configuration
from ihcc import data as data_lib
from ihcc import losses
from ihcc import models
from ihcc import parallel
from ihcc import pretrained
from ihcc import priors


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint."""


class TrainState(train_state.TrainState):
    """Parameters, optimiser state and everything else a checkpoint must restore."""

    batch_stats: Any = None
    # Running means over the training set that the priors use, each per cluster: "weights"
    # (mean cluster probability), "log_empty" (mean of log(1 - cluster probability)) and
    # "embedding_sums" (mean of cluster probability times instance embedding, [K, D]).
    cluster_stats: Any = None


def create_model(config: ml_collections.ConfigDict, num_participants: int) -> models.IHCC:
    return models.IHCC(
        depth=config.model.depth,
        feature_dim=config.model.feature_dim,
        class_num=config.model.class_num,
        num_participants=num_participants if config.model.participant_head else 0,
    )


def learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
    """Multiply the learning rate by `decay_rate` every `step_size` epochs."""
    return optax.exponential_decay(
        init_value=config.optim.learning_rate,
        transition_steps=max(1, config.optim.step_size * steps_per_epoch),
        decay_rate=config.optim.decay_rate,
        staircase=True,
    )


def create_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
    """Adam with L2 weight decay added to the gradient (as torch.optim.Adam), then step decay."""
    schedule = learning_rate_schedule(config, steps_per_epoch)
    transforms = []
    if config.optim.grad_clip_norm > 0:
        transforms.append(optax.clip_by_global_norm(config.optim.grad_clip_norm))
    if config.optim.weight_decay > 0:
        transforms.append(optax.add_decayed_weights(config.optim.weight_decay))
    transforms.append(optax.scale_by_adam())
    transforms.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*transforms)


def create_train_state(
    rng: jax.Array, config: ml_collections.ConfigDict, num_participants: int, steps_per_epoch: int
) -> TrainState:
    """Initialise the model (optionally from a local pretrained backbone) and optimiser."""
    model = create_model(config, num_participants)
    size = config.data.image_size
    variables = model.init(rng, jnp.zeros((2, size, size, 3), jnp.float32), train=False)
    variables = dict(variables)
    if config.model.pretrained:
        variables = pretrained.load_torchvision_resnet(
            config.model.pretrained, variables, config.model.depth
        )
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=create_optimizer(config, steps_per_epoch),
        batch_stats=variables["batch_stats"],
        cluster_stats=initial_cluster_stats(config.model.class_num, config.model.feature_dim),
    )


def initial_cluster_stats(num_clusters: int, feature_dim: int) -> dict[str, jax.Array]:
    """Return the running cluster statistics of a model that assigns every image uniformly."""
    return {
        "weights": priors.initial_mixture_weights(num_clusters),
        "log_empty": jnp.full((num_clusters,), jnp.log1p(-1.0 / num_clusters), jnp.float32),
        "embedding_sums": jnp.zeros((num_clusters, feature_dim), jnp.float32),
    }


def compute_loss_terms(
    outputs: dict[str, jax.Array],
    participant_labels: jax.Array,
    cluster_stats: dict[str, jax.Array],
    config: ml_collections.ConfigDict,
    num_images: int | None = None,
    progress=1.0,
):
    """Combine the IH-CC loss terms for the two views stacked along the batch axis.

    `num_images` is the size of the training set, which the "dp" prior needs, and
    `progress` the share of training done, in [0, 1], which sets the prior's schedule.

    `cluster_stats` contains the running means that `initial_cluster_stats` starts.

    Returns:
      (loss, (metrics, new_cluster_stats)).
    """
    batch_size = participant_labels.shape[0]
    z_i, z_j = outputs["z"][:batch_size], outputs["z"][batch_size:]
    probs = jax.nn.softmax(outputs["cluster_logits"], axis=-1)
    c_i, c_j = probs[:batch_size], probs[batch_size:]

    instance = losses.instance_loss(z_i, z_j, config.loss.instance_temperature)
    cluster, entropy = losses.cluster_loss(c_i, c_j, config.loss.cluster_temperature)
    prior_scale, entropy_weight = prior_schedule(config, progress)
    loss = instance + cluster + entropy_weight * entropy
    metrics = {"instance_loss": instance, "cluster_loss": cluster, "entropy_term": entropy}

    if "participant_logits" in outputs:
        participant = losses.participant_loss(
            outputs["participant_logits"],
            jnp.concatenate([participant_labels] * 2),
            form=config.loss.participant_form,
        )
        loss = loss + config.loss.participant_weight * participant
        metrics["participant_loss"] = participant

    new_cluster_stats = cluster_stats
    momentum = config.prior.ema_momentum
    if config.prior.kind == "reference":
        log_prior = priors.reference_stick_breaking(probs, config.prior.alpha)
    elif config.prior.kind == "gem":
        weights, new_weights = priors.mixture_weights(probs, cluster_stats["weights"], momentum)
        new_cluster_stats = {**cluster_stats, "weights": new_weights}
        log_prior = priors.gem_log_prior(weights, config.prior.alpha)
    elif config.prior.kind == "dp":
        if num_images is None:
            raise ValueError("prior.kind='dp' needs num_images, the size of the training set.")
        weights, new_weights = priors.mixture_weights(
            probs, cluster_stats["weights"], momentum, full_gradient=True
        )
        log_empty, new_log_empty = priors.running_mean(
            priors.log_one_minus(probs), cluster_stats["log_empty"], momentum, full_gradient=True
        )
        # Embeddings enter the likelihood as data: it moves the cluster head, not the features.
        z = jax.lax.stop_gradient(outputs["z"].astype(jnp.float32))
        mean_sums, new_mean_sums = priors.blend_running_mean(
            probs.T @ z / probs.shape[0],
            cluster_stats["embedding_sums"],
            momentum,
            full_gradient=True,
        )
        new_cluster_stats = {
            "weights": new_weights,
            "log_empty": new_log_empty,
            "embedding_sums": new_mean_sums,
        }
        log_prior = priors.dp_log_partition(weights, config.prior.alpha, num_images, log_empty)
        log_likelihood = priors.vmf_log_likelihood(mean_sums, config.prior.kappa)
        metrics["log_likelihood"] = log_likelihood
        log_prior = log_prior + log_likelihood
    elif config.prior.kind == "none":
        log_prior = jnp.zeros((), jnp.float32)
    else:
        raise ValueError(
            f"Invalid prior.kind {config.prior.kind!r}; use 'gem', 'dp', 'reference' or 'none'."
        )
    loss = loss - prior_scale * config.prior.weight * log_prior
    metrics["log_prior"] = log_prior
    metrics["prior_scale"] = jnp.asarray(prior_scale, jnp.float32)
    metrics["loss"] = loss
    metrics["occupied_in_batch"] = jnp.sum(
        jnp.any(jax.nn.one_hot(jnp.argmax(c_i, -1), probs.shape[-1]) > 0, axis=0)
    )
    return loss, (metrics, new_cluster_stats)


def prior_schedule(config: ml_collections.ConfigDict, progress):
    """Return (prior scale, entropy weight) at `progress`, the share of training done.

    The prior is off for the first `prior.warmup_fraction` of training, then its scale
    rises linearly from 0 to 1 over the next `prior.ramp_fraction`, while the entropy
    weight moves from `loss.entropy_weight` to `loss.entropy_weight` times
    `prior.entropy_scale_end`. With both fractions 0 the prior is on from the first step
    and the entropy weight is the end value throughout.
    """
    warmup = config.prior.warmup_fraction
    ramp = config.prior.ramp_fraction
    entropy_end = config.loss.entropy_weight * config.prior.entropy_scale_end
    if warmup == 0.0 and ramp == 0.0:
        return 1.0, entropy_end
    progress = jnp.asarray(progress, jnp.float32)
    if ramp > 0.0:
        scale = jnp.clip((progress - warmup) / ramp, 0.0, 1.0)
    else:
        scale = (progress >= warmup).astype(jnp.float32)
    return scale, config.loss.entropy_weight + (entropy_end - config.loss.entropy_weight) * scale


def make_views(rng: jax.Array, images: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
    """Return two augmented views of each image, stacked as [view 1; view 2]."""
    rng_1, rng_2 = jax.random.split(rng)
    augment = functools.partial(
        augment_lib.augment,
        out_size=config.data.image_size,
        jitter_strength=config.augment.jitter_strength,
        crop_scale=(config.augment.crop_scale_min, 1.0),
        flip_prob=config.augment.flip_prob,
        jitter_prob=config.augment.jitter_prob,
        grayscale_prob=config.augment.grayscale_prob,
    )
    return jnp.concatenate([augment(rng_1, images), augment(rng_2, images)])


def loss_and_grads(
    state: TrainState,
    images: jax.Array,
    participant_labels: jax.Array,
    rng: jax.Array,
    config: ml_collections.ConfigDict,
    num_images: int | None = None,
    progress=1.0,
):
    """Return the gradients of the IH-CC loss on one batch and everything the step needs.

    Returns:
      (grads, metrics, new_cluster_stats, new_batch_stats, cluster_logits of both views).
    """
    views = make_views(rng, images, config)

    def loss_fn(params):
        outputs, model_state = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            views,
            train=True,
            mutable=["batch_stats"],
        )
        loss, aux = compute_loss_terms(
            outputs, participant_labels, state.cluster_stats, config, num_images, progress
        )
        return loss, (aux, model_state, outputs["cluster_logits"])

    grads, ((metrics, cluster_stats), model_state, cluster_logits) = jax.grad(
        loss_fn, has_aux=True
    )(state.params)
    return grads, metrics, cluster_stats, model_state["batch_stats"], cluster_logits


def train_step(
    state: TrainState,
    images: jax.Array,
    participant_labels: jax.Array,
    base_rng: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    num_images: int | None = None,
    total_steps: int | None = None,
):
    """Run one optimisation step on a global batch of uint8 images.

    Both augmented views are made on the device from a key derived from `base_rng` and the
    step number, so resuming from a checkpoint needs no saved random state. The state
    argument is donated.

    Returns:
      (new_state, metrics, cluster_counts): cluster_counts[k] is how many images of the batch
      (first view) have cluster k as their argmax.
    """
    rng = jax.random.fold_in(base_rng, state.step)
    progress = 1.0 if not total_steps else state.step / total_steps
    grads, metrics, cluster_stats, batch_stats, cluster_logits = loss_and_grads(
        state, images, participant_labels, rng, config, num_images, progress
    )
    new_state = state.apply_gradients(
        grads=grads, batch_stats=batch_stats, cluster_stats=cluster_stats
    )
    metrics["grad_norm"] = optax.tree.norm(grads)
    batch_size = images.shape[0]
    cluster_counts = jnp.sum(
        jax.nn.one_hot(jnp.argmax(cluster_logits[:batch_size], -1), cluster_logits.shape[-1]),
        axis=0,
    )
    return new_state, metrics, cluster_counts


def make_train_step(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    num_images: int | None = None,
    total_steps: int | None = None,
):
    """Return the jitted train step for `mesh`: replicated state, batch sharded over devices.

    `num_images`, the size of the training set, is needed by the "dp" prior, and
    `total_steps` by the prior's warm-up and ramp.
    """
    # The key is an argument rather than a constant of the program, so runs that differ only
    # in their seed share one compiled step.
    base_rng = jax.device_put(
        jax.random.fold_in(jax.random.key(config.seed), 1), parallel.replicated(mesh)
    )
    replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    jitted = jax.jit(
        functools.partial(
            train_step, config=config, num_images=num_images, total_steps=total_steps
        ),
        in_shardings=(replicated, sharded, sharded, replicated),
        out_shardings=(replicated, replicated, replicated),
        donate_argnums=(0,),
    )

    def step(state, images, participant_labels):
        return jitted(state, images, participant_labels, base_rng)

    step.jitted = jitted
    return step


def epoch_permutation(seed: int, epoch: int, num_images: int) -> np.ndarray:
    """Return the image order of one epoch; depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_images)


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints, create=True)
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"), options=options
    )


def restore_checkpoint(
    manager: ocp.CheckpointManager, state: TrainState, step: int | None = None
) -> tuple[TrainState, dict]:
    """Restore `state` (whose shapes and shardings are the target) from a checkpoint step."""
    step = manager.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
    except ValueError as error:
        if "mixture_ema" not in str(error):
            raise
        raise configuration.ConfigError(
            f"The checkpoint at step {step} in {manager.directory} was written by an earlier "
            "version of ihcc, which kept only the mixture weights (mixture_ema) and not the "
            "cluster statistics this version saves (cluster_stats). Train again in a new "
            "--workdir."
        ) from error
    return restored["state"], dict(restored["meta"])


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, meta: dict) -> None:
    step = int(jax.device_get(state.step))
    if step in manager.all_steps():
        return
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    )
    manager.wait_until_finished()
    logging.info("Saved checkpoint at step %d in %s", step, manager.directory)


class _StopRequest:
    """Turns the first SIGTERM or SIGINT into a request to checkpoint and stop after a step.

    A second signal of either kind gets the default behaviour, so a second Ctrl-C still
    interrupts at once.
    """

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self._SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        logging.warning(
            "Signal %d received: saving a checkpoint and stopping after this step. "
            "Send it again to stop at once.",
            signum,
        )
        self.requested = True
        for restored_signum, handler in self._previous.items():
            signal.signal(restored_signum, handler)

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


class MetricsWriter:
    """Appends one JSON object per line to workdir/metrics.jsonl (process 0 only)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = jax.process_index() == 0

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def _mean_metrics(history: list[dict]) -> dict:
    stacked = jax.device_get(history)
    return {key: float(np.mean([h[key] for h in stacked])) for key in stacked[0]}


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    dataset: data_lib.TrainingData | None = None,
    *,
    max_steps: int | None = None,
) -> TrainState:
    """Train IH-CC on the configured data, resuming from the latest checkpoint in `workdir`.

    Args:
      config: the run configuration.
      workdir: folder for the cache, checkpoints, metrics.jsonl and config.json.
      dataset: already prepared training data (built from `config.data` when None).
      max_steps: stop after this global step (for tests and interrupted-run checks); the
        schedule and data order are still those of the full run.

    Returns:
      The final train state.
    """
    os.makedirs(workdir, exist_ok=True)
    dataset = dataset or data_lib.prepare_training_data(config, workdir)
    mesh = parallel.make_mesh()
    global_batch = config.train.batch_size
    parallel.check_batch_size(global_batch, mesh)
    num_images = len(dataset.images)
    if num_images < global_batch:
        raise ValueError(
            f"The training data has {num_images} usable images but train.batch_size is "
            f"{global_batch}; set --config.train.batch_size to at most {num_images}."
        )
    steps_per_epoch = num_images // global_batch
    total_steps = steps_per_epoch * config.train.num_epochs

    state = create_train_state(
        jax.random.key(config.seed), config, len(dataset.participants), steps_per_epoch
    )
    state = jax.device_put(state, parallel.replicated(mesh))
    manager = checkpoint_manager(workdir, config)
    meta = {
        "num_images": num_images,
        "steps_per_epoch": steps_per_epoch,
        "participants": dataset.participants,
    }
    saved_counts = None
    if manager.latest_step() is not None:
        state, saved_meta = restore_checkpoint(manager, state)
        if saved_meta.get("num_images") != num_images:
            logging.warning(
                "The checkpoint was trained on %s images and the data now has %d; the epoch "
                "order after resuming differs from an uninterrupted run.",
                saved_meta.get("num_images"),
                num_images,
            )
        logging.info("Resumed from checkpoint step %d.", int(state.step))
        saved_counts = saved_meta.get("epoch_cluster_counts")

    step_fn = make_train_step(config, mesh, num_images, total_steps)
    schedule = learning_rate_schedule(config, steps_per_epoch)
    writer = MetricsWriter(workdir)
    rows = parallel.process_slice(global_batch)
    start_step = int(jax.device_get(state.step))
    end_step = total_steps if max_steps is None else min(total_steps, max_steps)
    history = []
    epoch_counts = None
    if start_step % steps_per_epoch and saved_counts:
        # Resumed mid-epoch: the epoch's cluster counts so far were saved with the checkpoint.
        epoch_counts = jnp.asarray(saved_counts, jnp.float32)
    last_logged = timed_from = start_step
    tick = time.time()
    with _StopRequest() as stop:
        logging.info(
            "Training from step %d to %d: %d images, %d steps per epoch, global batch %d "
            "on %d devices.",
            start_step,
            end_step,
            num_images,
            steps_per_epoch,
            global_batch,
            mesh.devices.size,
        )
        for step in range(start_step, end_step):
            epoch, offset = divmod(step, steps_per_epoch)
            if offset == 0 or step == start_step:
                order = epoch_permutation(config.seed, epoch, num_images)
            if offset == 0 or epoch_counts is None:
                epoch_counts = jnp.zeros((config.model.class_num,), jnp.float32)
            indices = order[offset * global_batch : (offset + 1) * global_batch][rows]
            images, labels = dataset.batch(indices)
            batch = parallel.shard_batch((images, labels), mesh)
            state, metrics, counts = step_fn(state, *batch)
            epoch_counts = epoch_counts + counts
            history.append(metrics)

            done = step + 1
            if done % config.train.log_every_steps == 0 or done == end_step:
                summary = _mean_metrics(history)
                history = []
                if not np.isfinite(summary["loss"]):
                    raise FloatingPointError(
                        f"The loss became {summary['loss']} between steps {last_logged + 1} and {done}; "
                        "lower optim.learning_rate or check the input images. The last checkpoint "
                        "is still in the workdir."
                    )
                elapsed = time.time() - tick
                summary.update(
                    step=done,
                    epoch=done / steps_per_epoch,
                    learning_rate=float(schedule(done - 1)),
                    images_per_second=(done - timed_from) * global_batch / max(elapsed, 1e-9),
                )
                remaining_seconds = (end_step - done) * global_batch / summary["images_per_second"]
                logging.info(
                    "step %d/%d epoch %.2f (about %.0f min left): %s",
                    done,
                    end_step,
                    summary["epoch"],
                    remaining_seconds / 60,
                    ", ".join(
                        f"{k}={v:.4g}"
                        for k, v in sorted(summary.items())
                        if k not in ("step", "epoch")
                    ),
                )
                writer.write(summary)
                last_logged = timed_from = done
                tick = time.time()

            if done % steps_per_epoch == 0:
                occupied = int(jnp.sum(epoch_counts > 0))
                logging.info(
                    "Epoch %d done: %d of %d clusters occupied by this epoch's images.",
                    done // steps_per_epoch,
                    occupied,
                    config.model.class_num,
                )
                writer.write(
                    {"step": done, "epoch": done // steps_per_epoch, "occupied_clusters": occupied}
                )
                if (done // steps_per_epoch) % config.train.checkpoint_every_epochs == 0:
                    save_checkpoint(manager, state, meta)
            if stop.requested:
                meta["epoch_cluster_counts"] = _partial_epoch_counts(
                    epoch_counts, done, steps_per_epoch
                )
                save_checkpoint(manager, state, meta)
                manager.close()
                raise TrainingInterrupted(
                    f"Training stopped at step {done} on request, with a checkpoint saved in "
                    f"{manager.directory}; run the same command to resume."
                )
            if step == start_step:
                # The first step includes compilation; throughput counts from its end.
                jax.block_until_ready(state)
                timed_from, tick = done, time.time()
        meta["epoch_cluster_counts"] = _partial_epoch_counts(
            epoch_counts, end_step, steps_per_epoch
        )
        save_checkpoint(manager, state, meta)
    manager.close()
    return state


def _partial_epoch_counts(epoch_counts, done: int, steps_per_epoch: int) -> list[int]:
    """Return the cluster counts of an unfinished epoch for the checkpoint, [] at an epoch end."""
    if epoch_counts is None or done % steps_per_epoch == 0:
        return []
    return [int(c) for c in np.asarray(jax.device_get(epoch_counts))]
