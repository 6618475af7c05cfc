"""FSDP2 (fully_shard under ModelParallelStrategy) on CPU with 2 processes over gloo."""

import pytest

from tests.conftest import CONFIGS
from tests.test_distributed import run

FSDP2 = ["-c", str(CONFIGS / "strategy" / "fsdp2.yaml"), "--trainer.devices=2",
         "--trainer.enable_checkpointing=false"]


def test_fsdp2_shard_training_matches_one_process(tmp_path):
    one = run(tmp_path, "one", "dpo", "--data.batch_size=8",
              "--trainer.enable_checkpointing=false")[0]["losses"]
    two = run(tmp_path, "two", "dpo", "--data.batch_size=4", *FSDP2)
    assert two[0]["world_size"] == 2 and len(two[0]["losses"]) == len(one) == 12
    for step, (a, b0, b1) in enumerate(zip(one, two[0]["losses"], two[1]["losses"],
                                           strict=True)):
        assert (b0 + b1) / 2 == pytest.approx(a, rel=1e-4, abs=1e-5), step


def test_fsdp2_shard_online_generation_with_uneven_lengths_does_not_deadlock(tmp_path):
    # Ranks sample different responses for different prompts: lengths differ, and without
    # synced generation the rank that stops first would leave the other in a collective.
    ranks = run(tmp_path, "online", "sail_pr", *FSDP2)
    assert ranks[0]["pool_sha1"] == ranks[1]["pool_sha1"]
    assert [r["round"] for r in ranks[0]["rounds"]] == [0, 1]
