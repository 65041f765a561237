"""The hyperparameters of the published IH-CC PyTorch code, for reproducing its runs.

  python main.py --config=configs/paper.py --workdir=DIR --config.data.root=PHOTOS

ResNet-34 at 224 px, batch 64, K = 150, alpha = 15, lambda = 1, Adam at 0.002 with no
weight decay, halved every 15 epochs, 70 epochs, gradient clipping at 0.1, instance and
cluster temperatures 0.5 and 1.0, colour-jitter strength 0.8, feature_dim 128, and the
published per-image stick-breaking term and participant loss (the reference forms in
docs/method.md). Meant for an accelerator, because a ResNet-34 step at 224 px is far too
slow on a CPU.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.image_size = 224
    config.model.depth = 34
    config.model.feature_dim = 128
    config.model.class_num = 150
    config.augment.jitter_strength = 0.8
    config.loss.instance_temperature = 0.5
    config.loss.cluster_temperature = 1.0
    config.loss.entropy_weight = 1.0
    config.loss.participant_form = "reference"
    config.prior.kind = "reference"
    config.prior.alpha = 15.0
    config.prior.weight = 1.0
    config.prior.ema_momentum = 0.0
    config.prior.warmup_fraction = 0.0
    config.prior.ramp_fraction = 0.0
    config.prior.entropy_scale_end = 1.0
    config.optim.learning_rate = 0.002
    config.optim.weight_decay = 0.0
    config.optim.step_size = 15
    config.optim.decay_rate = 0.5
    config.optim.grad_clip_norm = 0.1
    config.train.batch_size = 64
    config.train.num_epochs = 70
    return config
