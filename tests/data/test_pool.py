"""Round files: written atomically, read back exactly, and bad ones named by file and line."""

import json

import pytest

from sail_lightning.data.pool import OnlinePair, read_round, round_path, write_round
from sail_lightning.data.tokenize import TokenizedPair
from sail_lightning.objectives import Route


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
