"""A real photo folder or manifest on a CPU or a single accelerator.

  python main.py --config=configs/photos.py --workdir=DIR \\
      --config.data.root=PHOTOS [--config.data.manifest=labels.csv]

ResNet-18 at 64 px, K = 150 under the default `dp` prior. See docs/results.md for what it scored
on a real 2,378-image set and how long it took.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.image_size = 64
    config.model.depth = 18
    config.model.class_num = 150
    config.train.batch_size = 128
    config.train.num_epochs = 30
    config.optim.learning_rate = 1e-3
    config.optim.step_size = 15
    return config
