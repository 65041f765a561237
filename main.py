"""Train IH-CC, assign hierarchical environment labels, and evaluate them.

python main.py --config=configs/demo.py --workdir=/tmp/ihcc_demo
python main.py --config=configs/photos.py --workdir=DIR --config.data.root=PHOTOS --mode=check
"""

import csv
import logging as logging_std
import os
import sys
import tempfile

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ihcc import assign
from ihcc import check
from ihcc import configuration
from ihcc import data
from ihcc import evaluate
from ihcc import inputs
from ihcc import train

FLAGS = flags.FLAGS

# Exit status for an invalid flag, configuration or input: the command must change. A run
# that fails on valid input (no usable image, no checkpoint to assign from) exits 1, and an
# interrupted training run 130.
EXIT_INVALID_INPUT = 2
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/demo.py.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Folder for the cache, checkpoints, metrics and outputs.")
flags.DEFINE_enum(
    "mode",
    "all",
    ["train", "assign", "evaluate", "all", "check"],
    "train: train or resume; assign: label images with the latest checkpoint; "
    "evaluate: score the labels against known ones; all: the three in turn; "
    "check: report on the input data and exit.",
)
flags.mark_flags_as_required(["config"])


class _QuietLibraryInfo(logging_std.Filter):
    """Drop INFO records that Orbax and tensorflow-datasets write on every checkpoint and read."""

    _PACKAGES = ("/orbax/", "/tensorflow_datasets/")

    def filter(self, record: logging_std.LogRecord) -> bool:
        if record.levelno > logging_std.INFO:
            return True
        return not any(package in record.pathname for package in self._PACKAGES)


def _save_config(config, workdir: str) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(path + ".tmp", path)


def _has_known_labels(config, workdir: str) -> bool:
    path = os.path.join(assign.assign_dir(workdir, config), "assignments.csv")
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return any(row["true_environment"] for row in csv.DictReader(f))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}", EXIT_INVALID_INPUT)
    config = FLAGS.config
    logging.get_absl_handler().addFilter(_QuietLibraryInfo())
    logging.info(
        "JAX process %d of %d; %d local and %d global devices (%s).",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )

    if FLAGS.mode == "check":
        with tempfile.TemporaryDirectory() as scratch:
            try:
                root, manifest = data.resolve_input(config.data, FLAGS.workdir or scratch)
            except inputs.InputError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            report = check.check_inputs(root, manifest, config.data.image_size)
        print(report.format())
        return report.exit_code

    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required for --mode=" + FLAGS.mode, EXIT_INVALID_INPUT)
    workdir = FLAGS.workdir
    try:
        configuration.check_workdir(config, workdir, training=FLAGS.mode in ("train", "all"))
        if FLAGS.mode in ("train", "all"):
            _save_config(config, workdir)
            train.train(config, workdir)
        if FLAGS.mode in ("assign", "all"):
            assign.assign(config, workdir)
        if FLAGS.mode == "evaluate" or (FLAGS.mode == "all" and _has_known_labels(config, workdir)):
            evaluate.evaluate(config, workdir)
    except train.TrainingInterrupted as e:
        logging.warning("%s", e)
        return 130
    except (inputs.InputError, configuration.ConfigError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID_INPUT
    except FileNotFoundError as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _parse_flags(argv: list[str]) -> list[str]:
    """Parse the command line, turning an invalid config file or override into one message."""
    try:
        remaining = FLAGS(argv)
        configuration.validate(FLAGS.config)
    except flags.Error as e:
        _exit_invalid(f"error: {e}\nPass --helpfull to list the flags.")
    except (AttributeError, KeyError) as e:
        # ml_collections raises these for an override of a field that the config lacks.
        message = str(e.args[0] if e.args else e)
        # ml_collections puts the repr of the message in the AttributeError.
        message = message.strip("'").replace("\\'", "'").replace("\\n", "\n")
        _exit_invalid(f"error: invalid config override: {message}")
    except (OSError, configuration.ConfigError) as e:
        _exit_invalid(f"error: {e}")
    return remaining


def _exit_invalid(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(EXIT_INVALID_INPUT)


def _run():
    try:
        app.run(main, flags_parser=_parse_flags)
    except KeyboardInterrupt:
        sys.exit("Interrupted. Checkpoints saved so far are kept; run the same command to resume.")


if __name__ == "__main__":
    _run()
