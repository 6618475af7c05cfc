"""OnlinePool: rounds written before they are trained on, restored from their paths."""

import json

import pytest

from sail_lightning.data.pool import OnlinePair, OnlinePool, read_round
from sail_lightning.data.tokenize import TokenizedPair
from sail_lightning.objectives import Route


def pairs(n: int, round_index: int = 0) -> list[OnlinePair]:
    return [OnlinePair(prompt=f"p{i}", chosen="a", rejected="b",
                       pair=TokenizedPair([1, 2], [3], [4], -1.0, -2.0),
                       route=int(Route.PR if i % 2 else Route.PP), round=round_index,
                       prompt_index=i, seed=7, label="a", scores={"chosen": 1.0,
                                                                   "rejected": 0.0})
            for i in range(n)]


def test_rounds_are_written_restored_and_the_latest_is_held(tmp_path):
    pool = OnlinePool(str(tmp_path / "rounds"))
    assert pool.current_round == -1 and pool.pairs == []
    pool.add_round(0, pairs(3))
    path = pool.add_round(1, pairs(4, 1))
    assert pool.current_round == 1 and len(pool.pairs) == 4
    lines = [json.loads(x) for x in open(path)]
    assert [x["round"] for x in lines] == [1] * 4 and lines[1]["route"] == "pr"
    assert read_round(path) == pool.pairs  # every field round-trips
    fresh = OnlinePool("elsewhere")
    fresh.load_state_dict(pool.state_dict())
    assert fresh.rounds == pool.rounds and fresh.pairs == pool.pairs


def test_only_the_writing_rank_writes(tmp_path):
    pool = OnlinePool(str(tmp_path))
    path = pool.add_round(0, pairs(2), write=False)
    assert not (tmp_path / "round_0000.jsonl").exists() and pool.rounds[0]["path"] == path


def test_lost_or_short_round_file_is_a_clear_error(tmp_path):
    pool = OnlinePool(str(tmp_path))
    path = pool.add_round(0, pairs(3))
    state = pool.state_dict()
    with open(path) as f:
        first = f.readline()
    with open(path, "w") as f:
        f.write(first)
    with pytest.raises(ValueError, match="1 pairs, the checkpoint recorded 3"):
        OnlinePool().load_state_dict(state)
    (tmp_path / "round_0000.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="round_0000"):
        OnlinePool().load_state_dict(state)


def test_offline_reference_is_set_and_cleared():
    import torch

    pool = OnlinePool()
    pool.set_offline_reference(torch.zeros(3, 2))
    assert pool.offline_ref.shape == (3, 2)
    pool.set_offline_reference(None)
    assert pool.offline_ref is None
