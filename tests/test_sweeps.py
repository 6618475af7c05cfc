"""The shipped sweeps sample only settings measured to train finite: every corner of every
sweep's ranges is in benchmarks/results/sweep_stability.json (benchmarks/sweep_stability.py)
and ended with a finite loss there."""

import json

import pytest

from benchmarks.sweep_stability import RESULTS, corners, extremes, load
from tests.conftest import CONFIGS

SWEEPS = sorted(p.stem for p in (CONFIGS / "sweeps").glob("*.yaml"))


def test_corners_by_hand():
    assert extremes({"values": [0.3, 0.05, 0.1]}) == [0.05, 0.3]
    assert extremes({"values": ["a", "b"]}) == ["a", "b"]
    assert extremes({"min": 0.0, "max": 0.6}) == [0.0, 0.6]
    two = {"parameters": {"x": {"min": 0, "max": 1}, "y": {"values": ["a", "b"]}}}
    assert corners(two) == [{"x": 0, "y": "a"}, {"x": 0, "y": "b"}, {"x": 1, "y": "a"},
                            {"x": 1, "y": "b"}]
    # Over 16 corners: all low, all high, each parameter alone high.
    five = {"parameters": {k: {"min": 0, "max": 1} for k in "abcde"}}
    got = corners(five)
    assert got[0] == dict.fromkeys("abcde", 0) and got[1] == dict.fromkeys("abcde", 1)
    assert len(got) == 7


@pytest.mark.parametrize("name", SWEEPS)
def test_every_corner_of_the_sweep_was_measured_finite(name):
    with open(RESULTS) as f:
        measured = json.load(f)
    assert name in measured, f"not measured: python benchmarks/sweep_stability.py {name}"
    finite = [row["params"] for row in measured[name] if row["finite"]]
    for corner in corners(load(name)):
        assert corner in finite, f"{name}: corner {corner} not measured finite"
