"""The shipped sweeps' extreme corners train finite: each corner of each sweep's ranges, run
as the agent runs it (the sweep's configs and options, then the corner's), on a small
budget. The all-high corner of every sweep runs in the default suite, every corner under
``-m slow``. ``benchmarks/sweep_stability.py`` ran the corners at the full quickstart; its
record must show every corner of each sweep it measured as finite."""

import math

import pytest

from benchmarks.sweep_stability import command_args, corners, extremes, load, run_corner
from tests.conftest import CONFIGS

SWEEPS = sorted(p.stem for p in (CONFIGS / "sweeps").glob("*.yaml"))
SMALL = ("--data.num_synthetic_pairs=40", "--trainer.max_steps=3", "--trainer.log_every_n_steps=1",
         "--trainer.limit_train_batches=3")


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


def test_the_released_code_form_has_its_own_sweep_at_small_rates():
    pr, released = load("sail_pr"), load("sail_pr_released")
    assert "model.response_term" not in pr["parameters"]
    assert "--model.response_term=released_code" in command_args(released)
    assert max(released["parameters"]["model.lr"]["values"]) <= 1e-4
    assert released["parameters"]["model.coef_pr"]["max"] <= 0.1


def check(name, corner, tmp_path):
    row = run_corner(load(name), corner, str(tmp_path), extra=SMALL)
    assert row["finite"] and math.isfinite(row["final_loss"]), (name, corner, row)


@pytest.mark.parametrize("name", SWEEPS)
def test_the_all_high_corner_of_each_sweep_trains_finite(name, tmp_path):
    high = {k: extremes(v)[-1] for k, v in load(name)["parameters"].items()}
    check(name, high, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", SWEEPS)
def test_every_corner_of_each_sweep_trains_finite(name, tmp_path):
    for i, corner in enumerate(corners(load(name))):
        check(name, corner, tmp_path / str(i))


def test_the_measured_corners_at_the_full_quickstart_were_finite():
    # benchmarks/sweep_stability.py trains each corner as the agent runs it, 3 epochs of the
    # quickstart; its record must cover every corner of each sweep it measured, all finite.
    import json

    from benchmarks.sweep_stability import RESULTS

    with open(RESULTS) as f:
        measured = json.load(f)
    assert "sail_pr_released" in measured  # the form that diverged at the old ranges
    for name, rows in measured.items():
        finite = [row["params"] for row in rows if row["finite"]]
        for corner in corners(load(name)):
            assert corner in finite, f"{name}: corner {corner} not measured finite"


@pytest.mark.parametrize("name", SWEEPS)
def test_every_corner_of_each_sweep_is_a_valid_method(name):
    # MethodSpec refuses disagreeing options before training (a share of 0 with its weight
    # > 0, for one): no corner of a shipped sweep may be such a setting.
    import yaml

    from benchmarks.sweep_stability import REPO
    from sail_lightning.method import MethodSpec

    sweep, args = load(name), command_args(load(name))
    model, data, gen = {}, {}, None
    for path in [args[i + 1] for i, a in enumerate(args) if a == "-c"]:
        with open(f"{REPO}/{path}") as f:
            cfg = yaml.safe_load(f)
        model.update(cfg.get("model", {}))
        data.update(cfg.get("data", {}))
        if "callbacks" in cfg.get("trainer", {}):  # a later config's list replaces it
            gen = next((cb.get("init_args", {}) for cb in cfg["trainer"]["callbacks"]
                        if cb["class_path"].endswith("PairGenerationCallback")), None)
    for corner in corners(sweep):
        m, d = dict(model), dict(data)
        for key, value in corner.items():
            (m if key.startswith("model.") else d)[key.split(".", 1)[1]] = value
        spec = MethodSpec.from_options(m, d, gen, "OracleLabeller" if gen is not None else None)
        assert spec.conflicts() == [], (name, corner, spec.conflicts())
