"""Kill a run mid-epoch with SIGKILL, resume from the last checkpoint: nothing is lost."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import CONFIGS, REPO
from tests.helpers import step_log


def overlay(tmp_path: Path, name: str, extra_callbacks: list) -> Path:
    root = tmp_path / name
    cfg = {
        "trainer": {
            "default_root_dir": str(root), "max_epochs": 3, "limit_val_batches": 2,
            "enable_progress_bar": False, "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(root), "name": "csv"}},
            "callbacks": [
                {"class_path": "sail_lightning.callbacks.PairGenerationCallback",
                 "init_args": {"progress": False, "sampling": {
                     "num_samples": 2, "max_new_tokens": 8, "batch_size": 64}}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"every_n_train_steps": 2, "save_last": True, "save_top_k": 0}},
                {"class_path": "tests.helpers.DumpPool", "init_args": {"path": str(root / "pool")}},
                *extra_callbacks,
            ],
        },
        "data": {"num_synthetic_pairs": 400},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit(config: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sail_lightning", "fit", "-c", str(CONFIGS / "quickstart.yaml"),
           "-c", str(CONFIGS / "method" / "sail_pr.yaml"), "-c", str(config), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def dump(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / name / "pool" / "rank0.json").read_text())


def test_sigkill_mid_epoch_then_resume_loses_no_pair_and_matches(tmp_path):
    full = fit(overlay(tmp_path, "full", []))
    assert full.returncode == 0, full.stderr[-3000:]
    # 17 steps per epoch: step 25 is in the middle of epoch 1, after round 1 was persisted.
    killed = fit(overlay(tmp_path, "run", [{"class_path": "tests.helpers.KillAt",
                                            "init_args": {"step": 25}}]))
    assert killed.returncode == -9, killed.stderr[-3000:]
    last = tmp_path / "run" / "csv" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.exists()
    resumed = fit(overlay(tmp_path, "run", []), f"--ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a, b = dump(tmp_path, "full"), dump(tmp_path, "run")
    assert [r["round"] for r in b["rounds"]] == [0, 1, 2]
    # Rounds 0 and 1 were restored from the killed run's files, round 2 generated after
    # the resume: every file is there, complete, and equal to the uninterrupted run's.
    assert "version_0" in b["rounds"][1]["path"] and "version_1" in b["rounds"][2]["path"]
    for ra, rb in zip(a["rounds"], b["rounds"], strict=True):
        assert ra["pairs"] == rb["pairs"] > 0
        assert Path(ra["path"]).read_text() == Path(rb["path"]).read_text()
    assert a["pool_sha1"] == b["pool_sha1"]
    # Training resumed at the right batch: the remaining steps' losses are the same.
    tail = len(b["losses"])
    assert 0 < tail < len(a["losses"])
    assert b["losses"] == a["losses"][-tail:]


def ddp_overlay(tmp_path: Path, name: str, extra_callbacks: list) -> Path:
    root = tmp_path / name
    cfg = {
        "trainer": {
            "default_root_dir": str(root), "max_epochs": 3, "limit_val_batches": 2,
            "enable_progress_bar": False, "log_every_n_steps": 1, "strategy": "ddp",
            "devices": 2, "num_sanity_val_steps": 0,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(root), "name": "csv"}},
            "callbacks": [
                {"class_path": "sail_lightning.callbacks.PairGenerationCallback",
                 "init_args": {"progress": False, "sampling": {
                     "num_samples": 2, "max_new_tokens": 8, "batch_size": 64}}},
                {"class_path": "tests.helpers.StepLog", "init_args": {"path": str(root / "steps")}},
                {"class_path": "tests.helpers.DumpPool", "init_args": {"path": str(root / "pool")}},
                *extra_callbacks,
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"every_n_train_steps": 3, "save_last": True, "save_top_k": 0}},
            ],
        },
        "data": {"num_synthetic_pairs": 200, "batch_size": 16},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_ddp_two_processes_resume_exactly_mid_epoch_0_and_after_the_last_batch(tmp_path):
    """2-process DDP (CPU, gloo): killed mid-epoch 0, and at the end of epoch 1 after a
    checkpoint on its last batch (before round 2 is generated); resumed runs train each
    rank's batches of the uninterrupted run, log its losses and build its rounds."""
    full = fit(ddp_overlay(tmp_path, "full", []))
    assert full.returncode == 0, full.stderr[-3000:]
    reference = step_log(tmp_path / "full" / "steps")
    per_epoch = len(reference[0]) // 3
    assert per_epoch % 3 == 0  # epoch 1 ends on a checkpoint (every 3 steps)
    rounds_a = [Path(r["path"]).read_bytes() for r in dump(tmp_path, "full")["rounds"]]
    for name, kill in (("mid0", {"step": per_epoch // 2 + 1}), ("last", {"epoch_end": 1})):
        crash = {"class_path": "tests.helpers.RaiseAt", "init_args": kill}
        killed = fit(ddp_overlay(tmp_path, name, [crash]))
        assert killed.returncode != 0 and "killed" in killed.stderr, killed.stderr[-3000:]
        last = tmp_path / name / "csv" / "version_0" / "checkpoints" / "last.ckpt"
        resumed = fit(ddp_overlay(tmp_path, name, []), f"--ckpt_path={last}")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert step_log(tmp_path / name / "steps") == reference, name
        rounds_b = [Path(r["path"]).read_bytes() for r in dump(tmp_path, name)["rounds"]]
        assert rounds_b == rounds_a, name
