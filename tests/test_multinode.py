"""More than one node: 2 nodes x 1 process on localhost (two ``torchrun --nnodes 2
--node_rank N`` launches over gloo, as on two machines), through the CLI with
``trainer.num_nodes=2``. The online pool is the same on every rank, and the losses are one
process's on the same global batch, under DDP and FSDP2."""

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

from tests.conftest import CONFIGS, REPO
from tests.helpers import assert_ranks_average_to

NODES = ["--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.accelerator=cpu"]
DDP = ["--trainer.strategy=ddp"]
FSDP2 = ["-c", str(CONFIGS / "strategy" / "fsdp2.yaml")]  # data_parallel_size 2 = 2 nodes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_nodes(tmp_path, name: str, method: str, *args: str) -> dict:
    """``sail-lightning fit`` of the quickstart with ``configs/method/<method>.yaml``, 2
    epochs of 6 steps, launched as two nodes of one process each; each rank's ``DumpPool``
    record (as ``tests.helpers.run_cli``)."""
    root = tmp_path / name
    cfg = {"trainer": {
        "default_root_dir": str(root), "max_epochs": 2, "limit_train_batches": 6,
        "limit_val_batches": 2, "enable_progress_bar": False, "log_every_n_steps": 1,
        "enable_checkpointing": False, "logger": False,
        "callbacks": [{"class_path": "tests.helpers.DumpPool",
                       "init_args": {"path": str(root / "pool")}}]}}
    if method != "dpo":
        cfg["trainer"]["callbacks"].insert(0, {
            "class_path": "sail_lightning.callbacks.PairGenerationCallback",
            "init_args": {"progress": False, "sampling": {"num_samples": 2, "max_new_tokens": 8,
                                                           "batch_size": 32}}})
    overlay = tmp_path / f"{name}.yaml"
    overlay.write_text(yaml.safe_dump(cfg))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--node-rank", str(node), "--master-addr", "127.0.0.1",
               "--master-port", str(port), "-m", "sail_lightning", "fit",
               "-c", str(CONFIGS / "quickstart.yaml"),
               "-c", str(CONFIGS / "method" / f"{method}.yaml"), "-c", str(overlay),
               "--data.num_synthetic_pairs=400", *NODES, *args]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in (root / "pool").glob("rank*.json")}


def assert_same_pools(ranks: dict) -> None:
    assert set(ranks) == {0, 1} and ranks[0]["world_size"] == 2
    assert ranks[0]["pairs"] > 0 and ranks[0]["pool_sha1"] == ranks[1]["pool_sha1"]
    assert ranks[0]["rounds"] == ranks[1]["rounds"]


def test_two_nodes_ddp_losses_equal_one_process(
        tmp_path, one_process_dpo):
    # Offline DPO on 2 nodes x 4 pairs: the one-process run on 8-pair batches, step by step.
    two = run_nodes(tmp_path, "dpo", "dpo", "--data.batch_size=4", *DDP)
    assert two[0]["world_size"] == 2 and len(two[0]["losses"]) == 12
    assert_ranks_average_to(one_process_dpo[0]["losses"], two)


@pytest.mark.slow
def test_two_nodes_ddp_online_pools_agree(tmp_path):
    # Each node generates its shard of each round; after the all-gather both hold every pair.
    assert_same_pools(run_nodes(tmp_path, "sail_pr", "sail_pr", *DDP))


@pytest.mark.slow
def test_two_nodes_fsdp2_losses_equal_one_process_and_pools_agree(tmp_path, one_process_dpo):
    two = run_nodes(tmp_path, "dpo", "dpo", "--data.batch_size=4", *FSDP2)
    assert_ranks_average_to(one_process_dpo[0]["losses"], two)
    assert_same_pools(run_nodes(tmp_path, "sail_pr", "sail_pr", *FSDP2))
