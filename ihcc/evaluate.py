"""Score the assign step's labels against known labels, beside two baselines.

Personal environments are scored over all images and within each participant (then
averaged over participants). The within-participant figure is the informative one: over
all images, labelling each participant as one environment already scores high, because
the participant split alone carries most of the information.
"""

import csv
import json
import os

import ml_collections
import numpy as np
from absl import logging

from ihcc import assign as assign_lib
from ihcc import metrics


def _read_labelled_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; run --mode=assign with this --workdir first.")
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return [row for row in csv.DictReader(f) if row["status"] == "labelled"]


def _level_scores(true, pred, participants) -> dict:
    overall = metrics.clustering_scores(true, pred)
    within = metrics.within_group_scores(participants, true, pred)
    return {
        "nmi": overall["nmi"],
        "ari": overall["ari"],
        "within_participant_nmi": within["nmi"],
        "within_participant_ari": within["ari"],
    }


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Compute NMI/ARI at both levels and the counts found against the true ones.

    Returns:
      The report written to workdir/assign/evaluation.json.
    """
    out_dir = assign_lib.assign_dir(workdir, config)
    rows = _read_labelled_rows(os.path.join(out_dir, "assignments.csv"))
    known = [r for r in rows if r["true_environment"]]
    if not known:
        raise ValueError(
            "No image has a known environment, so there is nothing to evaluate against; give a "
            "folder with ROOT/<participant>/<environment>/ levels or a manifest with an "
            "environment column."
        )
    if len(known) < len(rows):
        logging.warning(
            "%d of %d labelled images have no known environment and are left out of "
            "the evaluation.",
            len(rows) - len(known),
            len(rows),
        )

    participants = np.asarray([r["participant"] for r in known], dtype=object)
    true_env = np.asarray(
        [f"{r['participant']}/{r['true_environment']}" for r in known], dtype=object
    )
    pred_env = np.asarray([r["environment"] for r in known], dtype=object)
    report = {
        "images": len(known),
        "participants": len(set(participants)),
        "environments_true": len(set(true_env)),
        "environments_found": len(set(pred_env)),
        "environment": _level_scores(true_env, pred_env, participants),
    }

    has_types = all(r["true_environment_type"] for r in known)
    if has_types:
        true_type = np.asarray([r["true_environment_type"] for r in known], dtype=object)
        pred_type = np.asarray([r["environment_type"] for r in known], dtype=object)
        report["types_true"] = len(set(true_type))
        report["types_found"] = len(set(pred_type))
        report["environment_type"] = metrics.clustering_scores(true_type, pred_type)

    report["baselines"] = _baselines(config, out_dir, known, participants, true_env)
    with open(os.path.join(out_dir, "evaluation.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    logging.info("Evaluation:\n%s", format_report(report))
    return report


def _baselines(config, out_dir, known, participants, true_env) -> dict:
    """Trivial one-environment-per-participant labelling and k-means on the same features."""
    trivial = np.asarray(metrics.trivial_participant_labelling(participants), dtype=object)
    result = {"one_environment_per_participant": _level_scores(true_env, trivial, participants)}

    saved = np.load(os.path.join(out_dir, "features.npz"))
    row_of = {p: i for i, p in enumerate(saved["paths"])}
    features = saved["features"][[row_of[r["path"]] for r in known]]
    true_per_participant = {p: len(set(true_env[participants == p])) for p in set(participants)}
    overall = metrics.kmeans_baseline(features, len(set(true_env)), config.seed)
    within = metrics.kmeans_baseline(
        features, true_per_participant, config.seed, groups=participants
    )
    result["kmeans_true_k"] = {
        **{
            k: v
            for k, v in _level_scores(true_env, overall, participants).items()
            if not k.startswith("within")
        },
        **{
            k: v
            for k, v in _level_scores(true_env, within, participants).items()
            if k.startswith("within")
        },
    }
    return result


def format_report(report: dict) -> str:
    """Return the evaluation as a plain-text table."""
    lines = [
        f"images {report['images']}, participants {report['participants']}, environments found "
        f"{report['environments_found']} (true {report['environments_true']})"
        + (
            f", types found {report['types_found']} (true {report['types_true']})"
            if "types_true" in report
            else ""
        ),
        f"{'labelling':<34} {'env NMI':>8} {'env ARI':>8} {'within NMI':>11} {'within ARI':>11}",
    ]
    rows = [("ihcc", report["environment"])] + list(report["baselines"].items())
    for name, scores in rows:
        lines.append(
            f"{name:<34} {scores['nmi']:>8.3f} {scores['ari']:>8.3f} "
            f"{scores['within_participant_nmi']:>11.3f} "
            f"{scores['within_participant_ari']:>11.3f}"
        )
    if "environment_type" in report:
        t = report["environment_type"]
        lines.append(f"environment type: NMI {t['nmi']:.3f}, ARI {t['ari']:.3f}")
    return "\n".join(lines)
