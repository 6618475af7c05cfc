"""Two CPU processes (DDP over gloo) against one: the same pool, the same losses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import CONFIGS, REPO


def run(tmp_path: Path, name: str, method: str, *args: str, callbacks: tuple = ()) -> dict:
    root = tmp_path / name
    cfg = {"trainer": {
        "default_root_dir": str(root), "max_epochs": 2, "limit_train_batches": 6,
        "limit_val_batches": 2, "enable_progress_bar": False, "log_every_n_steps": 1,
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                   "init_args": {"save_dir": str(root), "name": "csv"}},
        "callbacks": [{"class_path": "tests.helpers.DumpPool",
                       "init_args": {"path": str(root / "pool")}}, *callbacks]}}
    if method != "dpo":
        cfg["trainer"]["callbacks"].insert(0, {
            "class_path": "sail_lightning.callbacks.PairGenerationCallback",
            "init_args": {"progress": False, "sampling": {"num_samples": 2, "max_new_tokens": 8,
                                                           "batch_size": 32}}})
    overlay = tmp_path / f"{name}.yaml"
    overlay.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "sail_lightning", "fit", "-c", str(CONFIGS / "quickstart.yaml"),
           "-c", str(CONFIGS / "method" / f"{method}.yaml"), "-c", str(overlay),
           "--data.num_synthetic_pairs=400", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in (root / "pool").glob("rank*.json")}


DDP = ["--trainer.strategy=ddp", "--trainer.devices=2"]


def test_ddp_two_processes_hold_identical_online_pools(tmp_path):
    ranks = run(tmp_path, "ddp", "sail_pr", *DDP)
    assert set(ranks) == {0, 1} and ranks[0]["world_size"] == 2
    # Each rank generated half of each round; after the all-gather both hold every pair.
    assert ranks[0]["pool_sha1"] == ranks[1]["pool_sha1"]
    assert ranks[0]["rounds"] == ranks[1]["rounds"]
    assert [r["round"] for r in ranks[0]["rounds"]] == [0, 1]
    lines = [json.loads(x) for x in Path(ranks[0]["rounds"][-1]["path"]).read_text().splitlines()]
    assert [x["prompt_index"] for x in lines] == list(range(len(lines)))
    assert {x["seed"] % 2 for x in lines} == {0, 1}  # both ranks' shards are in the pool


def test_ddp_losses_equal_one_process_on_the_same_global_batch(tmp_path):
    one = run(tmp_path, "one", "dpo", "--data.batch_size=8")[0]["losses"]
    two = run(tmp_path, "two", "dpo", "--data.batch_size=4", *DDP)
    assert len(one) == len(two[0]["losses"]) == 12
    # Equal local batches: the global batch's loss is the mean of the ranks' losses.
    for step, (a, b0, b1) in enumerate(zip(one, two[0]["losses"], two[1]["losses"],
                                           strict=True)):
        assert (b0 + b1) / 2 == pytest.approx(a, rel=1e-4, abs=1e-5), step
