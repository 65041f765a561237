"""Demo: a generated photo-EMA cohort, trained, assigned and evaluated on 2 CPU cores.

  python main.py --config=configs/demo.py --workdir=/tmp/ihcc_demo

The project generates the cohort itself (8 participants, 4 personal environments each,
drawn from 4 shared environment types; 24 photos per environment), so nothing is
downloaded. Outputs: /tmp/ihcc_demo/assign/{assignments.csv,summary.json,evaluation.json}.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.synthetic.enabled = True
    config.data.image_size = 32
    config.model.depth = 18
    config.model.class_num = 20
    config.train.batch_size = 64
    config.train.num_epochs = 30
    config.train.checkpoint_every_epochs = 10
    config.optim.learning_rate = 1e-3
    config.optim.step_size = 20
    return config
