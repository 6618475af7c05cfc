"""The packaged data samples: present, readable, small, licensed, and what the README says."""

import gzip
from pathlib import Path

import pytest

from sail_lightning.data import samples
from sail_lightning.data.records import read_preference_records
from tests.conftest import SHARED_DATA, needs_shared

FOLDER = Path(samples.__file__).parent


@pytest.mark.parametrize(("name", "fmt", "count"), [("ultrafeedback", "prompt", 200),
                                                    ("hh-rlhf", "hh", 100)])
def test_sample_reads_cleanly(name, fmt, count):
    records, stats = read_preference_records(samples.path(name), fmt=fmt)
    assert stats.read == stats.kept == len(records) == count


def test_samples_are_small_and_licensed():
    files = {p.name for p in FOLDER.iterdir() if p.is_file() and p.suffix != ".pyc"}
    assert {"README.md", "LICENSE-UltraFeedback", "LICENSE-HH-RLHF",
            *samples.SAMPLES.values()} <= files
    assert sum(p.stat().st_size for p in FOLDER.iterdir() if p.is_file()) < 300_000
    for license_file in ("LICENSE-UltraFeedback", "LICENSE-HH-RLHF"):
        assert (FOLDER / license_file).read_text().startswith("MIT License")
    with pytest.raises(KeyError, match="known: ultrafeedback, hh-rlhf"):
        samples.path("pku")


@needs_shared
@pytest.mark.parametrize(("name", "source"), [
    ("ultrafeedback", "ultrafeedback-binarized/train.jsonl.gz"),
    ("hh-rlhf", "hh-rlhf/helpful-base/test.jsonl.gz")])
def test_samples_are_the_first_lines_of_the_sources_unchanged(name, source):
    with gzip.open(samples.path(name), "rb") as f:
        sample = f.readlines()
    with gzip.open(SHARED_DATA / source, "rb") as f:
        original = [f.readline() for _ in sample]
    assert sample == original
