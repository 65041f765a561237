"""Measure the throughput of an IHCC forward + backward + SGD train step under jax.jit.

Run from the repository root:
  .venv/bin/python experiments/bench_step.py --depth=18 --image_size=64 --batch_size=64
  .venv/bin/python experiments/bench_step.py --depth=18 --image_size=64 --batch_size=64 \
      --noim2col_small_maps

The batch is sharded over a 1-D mesh of all current devices and the train state is
replicated, as in training. The loss is a stand-in that touches every output: cross-entropy of
the cluster logits against fixed random labels plus the mean cosine similarity between each z
and the next one in the batch. Prints the compile time of the first step and the images per
second over --steps further steps, each blocked until done.
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

# Make `ihcc` importable when the script is run by path from any folder.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ihcc import models, parallel  # noqa: E402

_DEPTH = flags.DEFINE_enum("depth", "18", ["18", "34", "50"], "ResNet depth.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Side of the square input images, in pixels.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 64, "Global images per step; must be a multiple of the device count.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after the compile step.")
_IM2COL = flags.DEFINE_bool(
    "im2col_small_maps", True,
    "Run convolutions whose input map is smaller than the kernel as im2col + matmul.")
_CLASS_NUM = flags.DEFINE_integer("class_num", 150, "Cluster-head outputs (K).")


def main(argv):
    del argv
    mesh = parallel.make_mesh()
    parallel.check_batch_size(_BATCH_SIZE.value, mesh)
    model = models.IHCC(depth=int(_DEPTH.value), class_num=_CLASS_NUM.value,
                        im2col_small_maps=_IM2COL.value)
    optimizer = optax.sgd(learning_rate=0.01, momentum=0.9)

    rng = np.random.default_rng(0)
    shape = (_BATCH_SIZE.value, _IMAGE_SIZE.value, _IMAGE_SIZE.value, 3)
    images = jax.device_put(rng.uniform(size=shape).astype(np.float32),
                            parallel.batch_sharded(mesh))
    labels = jax.device_put(rng.integers(0, _CLASS_NUM.value, _BATCH_SIZE.value),
                            parallel.batch_sharded(mesh))

    init = jax.jit(lambda key: model.init(key, images[:1], train=False),
                   out_shardings=parallel.replicated(mesh))
    variables = init(jax.random.key(0))
    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = jax.device_put(optimizer.init(params), parallel.replicated(mesh))

    def loss_fn(params, batch_stats, images, labels):
        outputs, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                       train=True, mutable=["batch_stats"])
        cross_entropy = optax.softmax_cross_entropy_with_integer_labels(
            outputs["cluster_logits"], labels).mean()
        z = outputs["z"]
        similarity = jnp.sum(z * jnp.roll(z, 1, axis=0), axis=-1).mean()
        return cross_entropy + similarity, updates["batch_stats"]

    @jax.jit
    def train_step(params, batch_stats, opt_state, images, labels):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    start = time.perf_counter()
    params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state, images,
                                                      labels)
    jax.block_until_ready(loss)
    compile_seconds = time.perf_counter() - start

    start = time.perf_counter()
    for _ in range(_STEPS.value):
        params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state,
                                                          images, labels)
        jax.block_until_ready(loss)
    seconds = time.perf_counter() - start

    print(f"devices: {mesh.devices.size} x {jax.devices()[0].platform}")
    print(f"depth={_DEPTH.value} image_size={_IMAGE_SIZE.value} batch_size={_BATCH_SIZE.value} "
          f"im2col_small_maps={_IM2COL.value}")
    print(f"first step (compile + run): {compile_seconds:.1f} s, final loss {float(loss):.4f}")
    print(f"{_STEPS.value * _BATCH_SIZE.value / seconds:.1f} images/s "
          f"({seconds / _STEPS.value:.3f} s/step over {_STEPS.value} steps)")


if __name__ == "__main__":
    app.run(main)
