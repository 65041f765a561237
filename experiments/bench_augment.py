"""Measure the throughput of `ihcc.augment.augment` under jax.jit on the default device.

Run from the repository root:
  .venv/bin/python experiments/bench_augment.py --batch_size=128 --image_size=64 --out_size=64

Prints the compile time and the images per second (one augmented view per image) of the
median and of the fastest of --iters calls after one warm-up call, each call blocked until
done. The fastest call is the better estimate on a machine shared with other jobs.
"""

import os
import sys
import time

import jax
import numpy as np
from absl import app, flags

# Make `ihcc` importable when the script is run by path from any folder.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ihcc import augment as augment_lib  # noqa: E402

_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Images per call.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Side of the square uint8 input images, in pixels.")
_OUT_SIZE = flags.DEFINE_integer("out_size", 64, "Side of the square augmented output, in pixels.")
_ITERS = flags.DEFINE_integer("iters", 50, "Timed calls after the warm-up call.")


def main(argv):
    del argv
    images_host = np.random.default_rng(0).integers(
        0, 256, (_BATCH_SIZE.value, _IMAGE_SIZE.value, _IMAGE_SIZE.value, 3), dtype=np.uint8
    )
    images = jax.device_put(images_host)
    augment = jax.jit(lambda rng, x: augment_lib.augment(rng, x, out_size=_OUT_SIZE.value))
    rng = jax.random.key(0)

    start = time.perf_counter()
    augment(rng, images).block_until_ready()
    compile_seconds = time.perf_counter() - start

    call_seconds = []
    for key in jax.random.split(jax.random.key(1), _ITERS.value):
        start = time.perf_counter()
        augment(key, images).block_until_ready()
        call_seconds.append(time.perf_counter() - start)

    median = float(np.median(call_seconds))
    best = min(call_seconds)
    batch = _BATCH_SIZE.value
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}")
    print(
        f"batch {batch}, {_IMAGE_SIZE.value} px -> {_OUT_SIZE.value} px, {_ITERS.value} calls: "
        f"first call (compile + run) {compile_seconds:.2f} s; "
        f"median {median * 1e3:.2f} ms per call = {batch / median:,.0f} images/s; "
        f"best {best * 1e3:.2f} ms = {batch / best:,.0f} images/s"
    )

if __name__ == "__main__":
    app.run(main)
