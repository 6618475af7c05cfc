"""A round with fewer pairs than its epoch's online slots says so: a warning naming both
counts, and gen/epoch_slots, gen/reused_slots in the logs (no silent reuse)."""

import logging

import yaml

from sail_lightning.cli import main
from tests.test_cli import QUICK, column, metrics, small


def test_a_short_round_is_counted_and_warned(tmp_path, caplog):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "sail_lightning.callbacks.PairGenerationCallback",
        "init_args": {"progress": False, "prompts_per_round": 5,
                      "sampling": {"num_samples": 2, "max_new_tokens": 8}}}]}}))
    with caplog.at_level(logging.WARNING, logger="sail_lightning.data"):
        main(["fit", "-c", QUICK, "-c", str(overlay), *small(tmp_path, epochs=1)])
    rows = metrics(tmp_path)
    (slots,), (reused,) = column(rows, "gen/epoch_slots"), column(rows, "gen/reused_slots")
    assert column(rows, "gen/prompts") == [5.0]
    assert slots > 5 and reused == slots - 5
    warning = next(r.getMessage() for r in caplog.records if "repeat a pair" in r.getMessage())
    assert f"has 5 PR pairs for the epoch's {int(slots)} PR slots" in warning
    assert f"{int(reused)} slots repeat a pair" in warning
