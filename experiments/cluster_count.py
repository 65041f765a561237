r"""Measure how many personal environments each prior finds against the true number.

Trains the same model on generated cohorts with known totals of personal environments
(and optionally on a real labelled photo set) under each stick-breaking prior, with the
same seeds and step budget, then assigns and evaluates. Each finished run appends one
JSON line to --results, so an interrupted sweep resumes where it stopped.

  python experiments/cluster_count.py --workdir=/tmp/ihcc_cluster_count \
      --results=docs/cluster_count.jsonl

Add --photos_root=... --photos_manifest=... to include a real photo set.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import demo  # noqa: E402
from ihcc import assign  # noqa: E402
from ihcc import evaluate  # noqa: E402
from ihcc import synthetic  # noqa: E402
from ihcc import train  # noqa: E402

# name: (participants, personal environments per participant, environment types).
COHORTS = {
    "env6": (3, 2, 2),
    "env24": (6, 4, 4),
    "env60": (10, 6, 6),
}

_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for the cohorts and the runs.")
_RESULTS = flags.DEFINE_string("results", None, "JSON-lines file that collects one line per run.")
_COHORTS = flags.DEFINE_list("cohorts", list(COHORTS), f"Generated cohorts from {list(COHORTS)}.")
_PRIORS = flags.DEFINE_list("priors", ["dp", "gem", "reference", "none"], "Values of prior.kind.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
_STEPS = flags.DEFINE_integer("steps", 240, "Train steps per run (the same budget for every run).")
_PHOTOS_PER_ENV = flags.DEFINE_integer("photos_per_env", 16, "Photos per generated environment.")
_CLASS_NUM = flags.DEFINE_integer("class_num", 150, "K, the upper bound on clusters.")
_PHOTOS_ROOT = flags.DEFINE_string("photos_root", "", "A real photo folder to include.")
_PHOTOS_MANIFEST = flags.DEFINE_string("photos_manifest", "", "Its manifest with known labels.")
_PHOTOS_STEPS = flags.DEFINE_integer("photos_steps", 240, "Train steps per run on the photos.")
_SUMMARY = flags.DEFINE_bool("summary", False, "Print the table of --results and exit.")
_OVERRIDES = flags.DEFINE_multi_string(
    "set", [], "Config override FIELD=VALUE applied to every run, e.g. prior.alpha=0.5."
)


def base_config(seed: int, prior: str):
    config = demo.get_config()
    config.seed = seed
    config.model.class_num = _CLASS_NUM.value
    config.prior.kind = prior
    if prior == "reference":
        # The published concentration for the published term.
        config.prior.alpha = 15.0
        config.prior.ema_momentum = 0.0
    config.train.log_every_steps = 20
    config.train.checkpoint_every_epochs = 1000
    if prior != "dp":
        # The other priors were measured at a constant weight and entropy weight.
        config.prior.warmup_fraction = 0.0
        config.prior.ramp_fraction = 0.0
        config.prior.entropy_scale_end = 1.0
    for item in _OVERRIDES.value:
        field, value = item.split("=", 1)
        node = config
        *parents, leaf = field.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = (
            type(node[leaf])(value) if not isinstance(node[leaf], bool) else value == "True"
        )
    return config


def set_epochs_for_steps(config, num_images: int, steps: int) -> None:
    steps_per_epoch = max(1, num_images // config.train.batch_size)
    config.train.num_epochs = max(1, round(steps / steps_per_epoch))
    # Halve the learning rate once, two thirds into the run.
    config.optim.step_size = max(1, (2 * config.train.num_epochs) // 3)


def run_one(name: str, config, root: str, manifest: str, steps: int) -> dict:
    # Runs that differ only in an override must not share (and resume from) one workdir.
    suffix = "".join(f"-{item.replace('=', '_')}" for item in _OVERRIDES.value)
    workdir = os.path.join(
        _WORKDIR.value, "runs", f"{name}-{config.prior.kind}-s{config.seed}{suffix}"
    )

    config.data.synthetic.enabled = False
    config.data.root, config.data.manifest = root, manifest
    with open(manifest, encoding="utf-8") as f:
        num_images = sum(1 for _ in f) - 1
    set_epochs_for_steps(config, num_images, steps)

    start = time.time()
    train.train(config, workdir)
    summary = assign.assign(config, workdir)
    report = evaluate.evaluate(config, workdir)

    return {
        "data": name,
        "prior": config.prior.kind,
        "alpha": config.prior.alpha,
        "prior_weight": config.prior.weight,
        "seed": config.seed,
        "steps": config.train.num_epochs * max(1, num_images // config.train.batch_size),
        "seconds": round(time.time() - start, 1),
        "environments_true": report["environments_true"],
        "environments_found": report["environments_found"],
        "types_true": report.get("types_true"),
        "types_found": report.get("types_found"),
        "occupied_clusters": summary["occupied_clusters"],
        "environment": report["environment"],
        "environment_type": report.get("environment_type"),
        "overrides": list(_OVERRIDES.value),
    }


def summarize(path: str) -> str:
    """Return a Markdown table of the runs in `path`: mean and range over seeds."""
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    groups = {}
    for r in records:
        groups.setdefault((r["data"], r["prior"], tuple(r["overrides"])), []).append(r)
    lines = [
        "| data | prior | overrides | seeds | environments true | found (per seed) | "
        "occupied clusters | env NMI | env ARI | within NMI | within ARI | type NMI | type ARI |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    data_order = [*COHORTS, "photos"]
    prior_order = ["dp", "gem", "reference", "none"]

    def row_order(key):
        data, prior, overrides = key
        return (
            bool(overrides),
            data_order.index(data) if data in data_order else len(data_order),
            prior_order.index(prior) if prior in prior_order else len(prior_order),
            overrides,
        )

    # Runs without overrides first, then by data set and prior.
    for data, prior, overrides in sorted(groups, key=row_order):
        runs = groups[(data, prior, overrides)]

        def mean(get):
            values = [get(r) for r in runs if get(r) is not None]
            return f"{sum(values) / len(values):.3f}" if values else "-"

        found = ", ".join(str(r["environments_found"]) for r in runs)
        occupied = ", ".join(str(r["occupied_clusters"]) for r in runs)
        lines.append(
            f"| {data} | {prior} | {' '.join(overrides) or '-'} | {len(runs)} | "
            f"{runs[0]['environments_true']} | {found} | {occupied} | "
            f"{mean(lambda r: r['environment']['nmi'])} | {mean(lambda r: r['environment']['ari'])} | "
            f"{mean(lambda r: r['environment']['within_participant_nmi'])} | "
            f"{mean(lambda r: r['environment']['within_participant_ari'])} | "
            f"{mean(lambda r: (r['environment_type'] or {}).get('nmi'))} | "
            f"{mean(lambda r: (r['environment_type'] or {}).get('ari'))} |"
        )
    return "\n".join(lines)


def done_keys(path: str) -> set:
    if not os.path.exists(path):
        return set()
    with open(path, encoding="utf-8") as f:
        return {
            (r["data"], r["prior"], r["seed"], tuple(r["overrides"])) for r in map(json.loads, f)
        }


def main(argv):
    del argv
    if _SUMMARY.value:
        print(summarize(_RESULTS.value))
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required to run the sweep.")
    done = done_keys(_RESULTS.value)
    datasets = []
    for name in filter(None, _COHORTS.value):
        participants, envs, types = COHORTS[name]
        manifest = synthetic.make_cohort(
            os.path.join(_WORKDIR.value, "cohorts", name),
            num_participants=participants,
            num_types=types,
            envs_per_participant=envs,
            photos_per_env=_PHOTOS_PER_ENV.value,
            image_size=demo.get_config().data.image_size,
            seed=0,
        )
        datasets.append(
            (name, os.path.join(os.path.dirname(manifest), "images"), manifest, _STEPS.value)
        )
    if _PHOTOS_MANIFEST.value:
        datasets.append(("photos", _PHOTOS_ROOT.value, _PHOTOS_MANIFEST.value, _PHOTOS_STEPS.value))

    for name, root, manifest, steps in datasets:
        for prior in _PRIORS.value:
            for seed in map(int, _SEEDS.value):
                if (name, prior, seed, tuple(_OVERRIDES.value)) in done:
                    continue
                record = run_one(name, base_config(seed, prior), root, manifest, steps)
                logging.info("Result: %s", record)
                with open(_RESULTS.value, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record, sort_keys=True) + "\n")


if __name__ == "__main__":
    flags.mark_flags_as_required(["results"])
    app.run(main)
