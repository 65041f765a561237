"""Default IH-CC configuration; every other config starts from this one.

Run (on a folder of photos):
  python main.py --config=configs/default.py --workdir=/tmp/ihcc \
      --config.data.root=/path/to/photos

Each field can be overridden on the command line as --config.<group>.<field>=value.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Return the default configuration."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Input. Give either a folder ROOT/<participant>/[<environment>/]<image>, a CSV manifest
    # with columns path, participant[, environment, environment_type], or both (the manifest's
    # relative paths then resolve against root).
    config.data = ml_collections.ConfigDict()
    config.data.root = ""
    config.data.manifest = ""
    # Side of the square image (pixels) that photos are decoded to once, cached, and fed to
    # the model.
    config.data.image_size = 64
    # A generated cohort with known labels, used instead of data.root when enabled.
    config.data.synthetic = ml_collections.ConfigDict()
    config.data.synthetic.enabled = False
    config.data.synthetic.num_participants = 8
    config.data.synthetic.num_types = 4
    config.data.synthetic.envs_per_participant = 4
    config.data.synthetic.photos_per_env = 24
    config.data.synthetic.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.depth = 18  # ResNet depth: 18, 34 or 50.
    config.model.feature_dim = 128  # Instance-head output size.
    config.model.class_num = 150  # K: upper bound on the number of clusters.
    config.model.participant_head = True
    # Optional local file (.safetensors or .npz) with torchvision ResNet weights for the
    # backbone. Never downloaded.
    config.model.pretrained = ""

    # Contrastive-clustering augmentation, applied on the device to make two views.
    config.augment = ml_collections.ConfigDict()
    config.augment.jitter_strength = 0.5  # s: brightness, contrast, saturation 0.8 s; hue 0.2 s.
    config.augment.crop_scale_min = 0.08  # Smallest crop area as a fraction of the image.
    config.augment.flip_prob = 0.5
    config.augment.jitter_prob = 0.8
    config.augment.grayscale_prob = 0.2

    config.loss = ml_collections.ConfigDict()
    config.loss.instance_temperature = 0.5
    config.loss.cluster_temperature = 1.0
    # Weight of the cluster-entropy term log K - H(mean assignment), which spreads mass
    # over clusters and so works against a sparsity prior.
    config.loss.entropy_weight = 1.0
    config.loss.participant_weight = 1.0
    # "cross_entropy" (log-softmax), or "reference": minus the mean softmax probability of the
    # true participant, as the published PyTorch code computes it.
    config.loss.participant_form = "cross_entropy"

    # Stick-breaking prior on cluster probabilities, subtracted from the loss as
    # weight * log-prior.
    config.prior = ml_collections.ConfigDict()
    # "dp" is a Dirichlet-process mixture. It scores the partition of the training set under
    # the GEM(alpha) prior with the weights integrated out, plus a von Mises-Fisher likelihood
    # of the instance embeddings. "gem" is the truncated GEM(alpha) log-density of the
    # mixture weights, "reference" the published per-image term, and "none" no prior.
    config.prior.kind = "dp"
    config.prior.alpha = 1.0  # Concentration: smaller values favour fewer clusters.
    config.prior.weight = 1.0  # lambda.
    # Concentration of the von Mises-Fisher likelihood ("dp" only): how far apart, on the
    # unit sphere of instance embeddings, two groups must be to be worth two clusters.
    config.prior.kappa = 5.0
    # Momentum of the running estimates across batches (mixture weights and, for "dp", the
    # other cluster statistics); 0 uses the batch alone.
    config.prior.ema_momentum = 0.9
    # Schedule, as shares of the training steps: no prior for the first warmup_fraction,
    # then over ramp_fraction the prior's weight rises linearly to prior.weight while the
    # entropy weight moves to loss.entropy_weight * entropy_scale_end.
    config.prior.warmup_fraction = 0.3
    config.prior.ramp_fraction = 0.3
    config.prior.entropy_scale_end = 0.0

    # Adam with L2 weight decay added to the gradient (as torch.optim.Adam), learning rate
    # halved every step_size epochs, global-norm gradient clipping.
    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 3e-4
    config.optim.weight_decay = 0.0
    config.optim.step_size = 15  # Epochs between learning-rate halvings.
    config.optim.decay_rate = 0.5
    config.optim.grad_clip_norm = 1.0  # 0 disables clipping.

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 64  # Global batch over all devices and hosts.
    config.train.num_epochs = 20
    config.train.log_every_steps = 10
    config.train.checkpoint_every_epochs = 5
    config.train.keep_checkpoints = 3

    # The assign step labels every image of assign.root / assign.manifest (the training data
    # when both are empty).
    config.assign = ml_collections.ConfigDict()
    config.assign.root = ""
    config.assign.manifest = ""
    config.assign.batch_size = 128
    # Personal environments whose centroid cosine similarity exceeds this threshold under
    # average linkage share an environment type.
    config.assign.type_threshold = 0.72
    # Features for environment-type centroids: "backbone" (pooled ResNet output) or
    # "instance" (the instance head's embedding). Both are L2-normalised per image.
    config.assign.type_feature = "backbone"
    return config
