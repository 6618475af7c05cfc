"""The wheel a user installs (`pip install .`, not editable): the library and its data
samples, without the benchmarks or tests beside it."""

import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(REPO)], check=True, capture_output=True,
                   timeout=300)
    (wheel,) = out.glob("sail_lightning-*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


def test_wheel_ships_the_library_and_its_samples_only(wheel_names):
    assert "sail_lightning/module.py" in wheel_names
    assert "sail_lightning/policy_pair.py" in wheel_names
    assert "sail_lightning/instructions/task.py" in wheel_names
    for sample in ("ultrafeedback.jsonl.gz", "hh-rlhf-helpful-base.jsonl.gz",
                   "LICENSE-UltraFeedback", "README.md", "alpaca-eval-instructions.jsonl.gz",
                   "vicuna-bench-questions.jsonl.gz", "ultrafeedback-prompts.jsonl.gz",
                   "LICENSE-AlpacaEval-data-CC-BY-NC-4.0", "LICENSE-FastChat-Apache-2.0"):
        assert f"sail_lightning/data/samples/{sample}" in wheel_names, sample
    # The comparison lives beside the library (benchmarks/), not inside it.
    assert not any(n.startswith(("benchmarks/", "tests/", "sail_lightning/experiments"))
                   for n in wheel_names)
