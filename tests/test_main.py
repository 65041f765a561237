"""End-to-end runs of main.py as a user runs it."""

import json
import os
import signal
import subprocess
import sys

from conftest import REPO_ROOT


def run_main(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "main.py", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_tiny_run_trains_assigns_and_evaluates(tmp_path):
    workdir = tmp_path / "run"
    result = run_main("--config=configs/tiny.py", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]

    for name in (
        "config.json",
        "metrics.jsonl",
        "assign/assignments.csv",
        "assign/summary.json",
        "assign/evaluation.json",
    ):
        assert (workdir / name).exists(), name
    with open(workdir / "config.json") as f:
        assert json.load(f)["model"]["class_num"] == 8
    with open(workdir / "assign" / "evaluation.json") as f:
        report = json.load(f)
    assert report["environments_true"] == 6
    assert report["images"] == 24

    # A second train call finds the final checkpoint and trains no further.
    again = run_main("--config=configs/tiny.py", f"--workdir={workdir}", "--mode=train")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Resumed from checkpoint step 6" in again.stderr


def test_check_mode_reports_the_input(tmp_path):
    result = run_main("--config=configs/tiny.py", f"--workdir={tmp_path}", "--mode=check")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "p00" in result.stdout
    assert "24" in result.stdout


def test_missing_root_fails_with_clear_message(tmp_path):
    missing = tmp_path / "no-such-folder"
    result = run_main(
        "--config=configs/default.py",
        f"--workdir={tmp_path / 'run'}",
        f"--config.data.root={missing}",
        "--mode=train",
    )
    assert result.returncode == 2
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr


def test_config_override_is_applied(tmp_path):
    workdir = tmp_path / "run"
    result = run_main(
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        "--mode=train",
        "--config.train.num_epochs=1",
        "--config.train.log_every_steps=3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(workdir / "config.json") as f:
        saved = json.load(f)
    assert saved["train"]["num_epochs"] == 1
    assert saved["train"]["log_every_steps"] == 3
    with open(workdir / "metrics.jsonl") as f:
        logged = [json.loads(line)["step"] for line in f if "loss" in json.loads(line)]
    assert logged == [3]


def test_misspelled_override_fails_without_traceback(tmp_path):
    result = run_main(
        "--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.train.num_epoch=1"
    )
    assert result.returncode == 2
    assert "num_epochs" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_choice_fails_before_training(tmp_path):
    result = run_main(
        "--config=configs/tiny.py",
        f"--workdir={tmp_path / 'run'}",
        "--config.assign.type_feature=pixels",
    )
    assert result.returncode == 2
    assert "assign.type_feature" in result.stderr
    assert not (tmp_path / "run").exists()


def test_interrupt_saves_checkpoint_and_skips_assign(tmp_path):
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        [
            sys.executable,
            "main.py",
            "--config=configs/tiny.py",
            f"--workdir={workdir}",
            "--config.train.num_epochs=500",
        ],
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stderr:
        if "Training from step" in line:
            process.send_signal(signal.SIGINT)
            break
    remaining = process.communicate(timeout=600)[1]
    assert process.returncode == 130, remaining[-3000:]
    assert "Training stopped at step" in remaining
    assert (workdir / "checkpoints").is_dir()
    assert not (workdir / "assign").exists()
