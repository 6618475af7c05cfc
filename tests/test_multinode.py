"""More than one node: 2 nodes x 1 process on localhost (two ``torchrun --nnodes 2
--node_rank N`` launches over gloo, as on two machines), through the CLI with
``trainer.num_nodes=2``. The online pool is the same on every rank, and the losses are one
process's on the same global batch, under DDP and FSDP2."""

import os
import subprocess
import sys

import pytest

from tests.conftest import CONFIGS, REPO
from tests.helpers import assert_ranks_average_to, dumped_pools, fit_command
from tests.servers import free_port

NODES = ["--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.accelerator=cpu"]
DDP = ["--trainer.strategy=ddp"]
FSDP2 = ["-c", str(CONFIGS / "strategy" / "fsdp2.yaml")]  # data_parallel_size 2 = 2 nodes


def run_nodes(tmp_path, name: str, method: str, *args: str) -> dict:
    """``sail-lightning fit`` of the quickstart with ``configs/method/<method>.yaml``, 2
    epochs of 6 steps, launched as two nodes of one process each; each rank's ``DumpPool``
    record (as ``tests.helpers.run_cli``)."""
    root, fit_args = fit_command(tmp_path, name, method,
                                 trainer={"enable_checkpointing": False, "logger": False})
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--node-rank", str(node), "--master-addr", "127.0.0.1",
               "--master-port", str(port), "-m", "sail_lightning", *fit_args, *NODES, *args]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
    return dumped_pools(root)


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
