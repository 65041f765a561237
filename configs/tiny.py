"""A tiny model on a tiny generated cohort: checks the whole pipeline in about a minute.

  python main.py --config=configs/tiny.py --workdir=/tmp/ihcc_tiny

The scores mean nothing at this size; the tests use this config for end-to-end runs.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.synthetic.enabled = True
    config.data.synthetic.num_participants = 3
    config.data.synthetic.num_types = 2
    config.data.synthetic.envs_per_participant = 2
    config.data.synthetic.photos_per_env = 4
    config.data.image_size = 16
    config.model.depth = 18
    config.model.feature_dim = 16
    config.model.class_num = 8
    config.train.batch_size = 8
    config.train.num_epochs = 2
    config.train.log_every_steps = 1
    config.train.checkpoint_every_epochs = 1
    config.assign.batch_size = 8
    return config
