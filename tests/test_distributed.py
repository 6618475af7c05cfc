"""Two CPU processes (DDP over gloo) against one: the same pool, the same losses."""

import json
from pathlib import Path

from tests.helpers import assert_ranks_average_to
from tests.helpers import run_cli as run

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


def test_ddp_losses_equal_one_process_on_the_same_global_batch(tmp_path, one_process_dpo):
    one = one_process_dpo[0]["losses"]
    two = run(tmp_path, "two", "dpo", "--data.batch_size=4", *DDP)
    assert len(one) == len(two[0]["losses"]) == 12
    assert_ranks_average_to(one, two)
