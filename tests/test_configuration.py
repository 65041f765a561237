"""Tests for the configuration checks that run before any work starts."""

import json

import pytest

from ihcc import configuration

from conftest import tiny_config


@pytest.mark.parametrize(
    "group, field, value",
    [
        ("prior", "kind", "gmm"),
        ("loss", "participant_form", "ce"),
        ("assign", "type_feature", "pixels"),
        ("model", "depth", 19),
        ("model", "class_num", 1),
        ("train", "batch_size", 0),
        ("prior", "ema_momentum", 1.0),
        ("prior", "alpha", 0.0),
        ("prior", "kappa", -1.0),
        ("prior", "warmup_fraction", 0.8),
        ("assign", "type_threshold", 1.5),
    ],
)
def test_validate_rejects_invalid_value(group, field, value):
    config = tiny_config()
    config[group][field] = value
    with pytest.raises(configuration.ConfigError, match=f"{group}.{field}"):
        configuration.validate(config)


def test_validate_accepts_shipped_configs():
    from configs import default, demo, paper, photos, tiny

    for module in (default, demo, paper, photos, tiny):
        configuration.validate(module.get_config())


def test_validate_rejects_root_with_synthetic():
    config = tiny_config()
    config.data.root = "/photos"
    with pytest.raises(configuration.ConfigError, match="synthetic.enabled=False"):
        configuration.validate(config)


def test_check_workdir_rejects_other_model(tmp_path):
    config = tiny_config()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    configuration.check_workdir(config, str(tmp_path))

    config.model.class_num = 12
    with pytest.raises(configuration.ConfigError, match="model.class_num=8"):
        configuration.check_workdir(config, str(tmp_path))


def test_check_workdir_training_rejects_other_prior(tmp_path):
    config = tiny_config()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))

    config.train.num_epochs = 10
    configuration.check_workdir(config, str(tmp_path), training=True)
    config.prior.kind = "gem"
    configuration.check_workdir(config, str(tmp_path))
    with pytest.raises(configuration.ConfigError, match="prior.kind='dp'"):
        configuration.check_workdir(config, str(tmp_path), training=True)


def test_check_workdir_rejects_file(tmp_path):
    path = tmp_path / "afile"
    path.write_text("")
    with pytest.raises(configuration.ConfigError, match="is a file"):
        configuration.check_workdir(tiny_config(), str(path))
