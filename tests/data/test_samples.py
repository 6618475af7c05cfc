"""The packaged data samples: present, readable, small, licensed, and what the README says."""

import gzip
from pathlib import Path

import pytest

from sail_lightning.data import samples
from sail_lightning.data.records import read_preference_records
from tests.conftest import SHARED_DATA, needs_shared

FOLDER = Path(samples.__file__).parent
PROMPT_SETS = ("alpaca-eval", "vicuna-bench", "ultrafeedback-prompts")


@pytest.mark.parametrize(("name", "fmt", "count"), [("ultrafeedback", "prompt", 200),
                                                    ("hh-rlhf", "hh", 100)])
def test_sample_reads_cleanly(name, fmt, count):
    records, stats = read_preference_records(samples.path(name), fmt=fmt)
    assert stats.read == stats.kept == len(records) == count


def test_samples_are_small_and_licensed():
    files = {p.name for p in FOLDER.iterdir() if p.is_file() and p.suffix != ".pyc"}
    assert {"README.md", "LICENSE-UltraFeedback", "LICENSE-HH-RLHF",
            *samples.SAMPLES.values()} <= files
    prompt_sets = {samples.SAMPLES[n] for n in PROMPT_SETS} | {
        "LICENSE-AlpacaEval-data-CC-BY-NC-4.0", "LICENSE-FastChat-Apache-2.0"}
    assert prompt_sets <= files
    sizes = {p.name: p.stat().st_size for p in FOLDER.iterdir() if p.is_file()}
    assert sum(v for k, v in sizes.items() if k not in prompt_sets) < 300_000
    assert sum(sizes[k] for k in prompt_sets) < 200_000  # the instructions task's prompts
    for license_file in ("LICENSE-UltraFeedback", "LICENSE-HH-RLHF"):
        assert (FOLDER / license_file).read_text().startswith("MIT License")
    assert "Attribution-NonCommercial 4.0" in (
        FOLDER / "LICENSE-AlpacaEval-data-CC-BY-NC-4.0").read_text()
    assert "Apache License" in (FOLDER / "LICENSE-FastChat-Apache-2.0").read_text()
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


@needs_shared
@pytest.mark.parametrize(("name", "source"), [
    ("alpaca-eval", "eval-prompts/alpaca_eval_instructions.jsonl"),
    ("vicuna-bench", "eval-prompts/vicuna_bench_questions.jsonl")])
def test_prompt_sets_are_the_sources_unchanged(name, source):
    with gzip.open(samples.path(name), "rb") as f:
        assert f.read() == (SHARED_DATA / source).read_bytes()


@needs_shared
def test_ultrafeedback_prompts_are_the_short_prompts_of_the_sources_pairs():
    import json

    from sail_lightning.instructions import count_words

    with gzip.open(SHARED_DATA / "ultrafeedback-binarized/train.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    with gzip.open(samples.path("ultrafeedback-prompts"), "rt") as f:
        packaged = [json.loads(line) for line in f]
    assert packaged == [{"prompt": r["prompt"], "source_index": r["source_index"]}
                        for r in rows if count_words(r["prompt"].strip()) <= 100]
