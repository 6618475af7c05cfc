"""Every shipped method trains and builds rounds bit for bit as the code before the pair-mode
refactor did (``tests/method_golden.py`` computes the values, ``tests/data/method_golden.json``
holds them): a refactor of pair modes, losses or options must not change a single bit."""

import json

import pytest

from tests.method_golden import FIXTURE, METHODS, run_method

GOLDEN = json.loads(FIXTURE.read_text())


def test_the_fixture_covers_every_shipped_method():
    assert sorted(GOLDEN) == METHODS


@pytest.mark.parametrize("method", METHODS)
def test_losses_and_rounds_are_bit_identical_to_the_recorded_ones(method, tmp_path):
    got = run_method(method, tmp_path)
    want = GOLDEN[method]
    assert got["rounds"] == want["rounds"], "a round file differs"
    assert got["losses"] == want["losses"], "a training loss differs"
    assert got["val_losses"] == want["val_losses"], "a validation loss differs"
