"""benchmarks/step_cost.py runs (--quick) and ends with its one JSON line: every method's step
ratio to DPO, the host syncs per step and the round's cost per pair."""

import json

from benchmarks.step_cost import main


def test_quick_step_cost_reports_every_method(tmp_path, capsys):
    out = main(["--quick", "--out", str(tmp_path / "step_cost.json")])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads((tmp_path / "step_cost.json").read_text()) == json.loads(
        json.dumps(out))
    ratios = last["step_ratio_vs_dpo"]
    assert {"dpo", "sail_dp", "sail_pp", "sail_pr", "sail_pr_released_code", "selm",
            "xpo"} <= set(ratios) and ratios["dpo"] == 1.0
    assert all(r > 0 for r in ratios.values())
    # The training step asks the device nothing about its batch beyond the model's own syncs.
    syncs = last["host_syncs_per_step"]
    assert syncs["sail_pr"] < syncs["sail_pr_no_route_hint"]
    assert set(last["round"]["ms_per_pair"]) >= {"generation", "label", "reference", "write"}
