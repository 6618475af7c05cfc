"""The online pool: round files written atomically, read back exactly (bad ones named by
file and line), rounds restored from their paths."""

import json

import pytest

from sail_lightning.common import Route
from sail_lightning.data.pool import OnlinePair, OnlinePool, read_round, round_path, write_round
from sail_lightning.data.tokenize import TokenizedPair


def pairs(n: int) -> list[OnlinePair]:
    return [OnlinePair(prompt=f"p{i}", chosen="a b", rejected="b a",
                       pair=TokenizedPair([1, 5 + i], [6, 2], [7, 2], -1.5, -2.0),
                       route=int(Route.PR), round=3, prompt_index=i, seed=11, label="a",
                       scores={"chosen": 0.5, "rejected": -0.5}, extra={"note": i})
            for i in range(n)]


def test_round_file_round_trip(tmp_path):
    path = round_path(str(tmp_path), 3)
    write_round(path, pairs(4))
    assert path.endswith("round_0003.jsonl")
    assert read_round(path) == pairs(4)


def test_cut_off_round_file_names_file_and_line(tmp_path):
    path = round_path(str(tmp_path), 0)
    write_round(path, pairs(5))
    text = open(path, encoding="utf-8").read()
    cut = text.index("\n", text.index("\n") + 1) + 30  # 30 characters into line 3
    open(path, "w", encoding="utf-8").write(text[:cut])
    with pytest.raises(ValueError, match=rf"^{path}:3: malformed JSON .*cut off"):
        read_round(path)


def test_round_line_without_a_pair_names_file_and_line(tmp_path):
    path = round_path(str(tmp_path), 0)
    write_round(path, pairs(2))
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n" + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    with pytest.raises(ValueError, match=rf"^{path}:4: not an online pair \(KeyError"):
        read_round(path)


def test_missing_round_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="is missing"):
        read_round(str(tmp_path / "round_0001.jsonl"))


def pool_pairs(n: int, round_index: int = 0) -> list[OnlinePair]:
    return [OnlinePair(prompt=f"p{i}", chosen="a", rejected="b",
                       pair=TokenizedPair([1, 2], [3], [4], -1.0, -2.0),
                       route=int(Route.PR if i % 2 else Route.PP), round=round_index,
                       prompt_index=i, seed=7, label="a", scores={"chosen": 1.0,
                                                                   "rejected": 0.0})
            for i in range(n)]


def test_rounds_are_written_restored_and_the_latest_is_held(tmp_path):
    pool = OnlinePool(str(tmp_path / "rounds"))
    assert pool.current_round == -1 and pool.pairs == []
    pool.add_round(0, pool_pairs(3))
    path = pool.add_round(1, pool_pairs(4, 1))
    assert pool.current_round == 1 and len(pool.pairs) == 4
    lines = [json.loads(x) for x in open(path)]
    assert [x["round"] for x in lines] == [1] * 4 and lines[1]["route"] == "pr"
    assert read_round(path) == pool.pairs  # every field round-trips
    fresh = OnlinePool("elsewhere")
    fresh.load_state_dict(pool.state_dict())
    assert fresh.rounds == pool.rounds and fresh.pairs == pool.pairs


def test_only_the_writing_rank_writes(tmp_path):
    pool = OnlinePool(str(tmp_path))
    path = pool.add_round(0, pool_pairs(2), write=False)
    assert not (tmp_path / "round_0000.jsonl").exists() and pool.rounds[0]["path"] == path


def test_lost_or_short_round_file_is_a_clear_error(tmp_path):
    pool = OnlinePool(str(tmp_path))
    path = pool.add_round(0, pool_pairs(3))
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
