"""``benchmarks/online_round.py --engine hf,vllm``: each engine's round runs beside TRL's in
one process, on the same prompts (``-m vllm``: the second environment of
``.ci/vllm-tests.sh``, which has vLLM's CPU build and the ``[bench]`` extra's TRL)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.online_round import main  # noqa: E402

pytestmark = pytest.mark.vllm


def test_both_engines_and_trl_run_side_by_side_on_the_same_prompts():
    out = main(["--quick", "--pairs", "8", "--batch-size", "4", "--max-new-tokens", "4",
                "--heads", "2", "--engine", "hf,vllm"])
    assert list(out["by_engine"]) == ["hf", "vllm"]
    assert out["trl"]["steps"] == 2 and out["trl"]["same_prompt_ids"]
    for engine, e in out["by_engine"].items():
        ours = e["ours"]
        assert ours["engine"] == engine and ours["same_prompts"] and ours["steps"] == 2
        assert ours["generated_tokens"] > 0
        assert e["speedup_vs_trl"] == pytest.approx(out["trl"]["seconds"] / ours["seconds"],
                                                    rel=0.02)  # of rounded seconds
    # vLLM's engine is built in the warm-up, not in the round measured.
    assert out["by_engine"]["vllm"]["ours"]["warmup_seconds"] > 0
