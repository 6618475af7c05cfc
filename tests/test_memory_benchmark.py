"""benchmarks/memory.py --quick runs and ends with one JSON line of positive, finite values.

The targets are not checked: a ~10M-parameter model is too small for them (fixed costs of the
libraries' first training step dominate its peaks).
"""

import json
import math
import subprocess
import sys

from tests.conftest import REPO

VARIANTS = ("lora_ref", "policy_only", "qlora", "qlora_fp32", "full")


def test_memory_benchmark_quick_reports_every_variant():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "memory.py"), "--quick"],
                          capture_output=True, text=True, timeout=170, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("ref_adapter_vs_policy_only", "qlora_vs_lora_fp32"):
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    for key in ("total_peak_mib", "step_peak_rss_mib", "step_increment_mib"):
        assert set(result[key]) == set(VARIANTS), key
        assert all(math.isfinite(v) and v > 0 for v in result[key].values()), (key, result[key])
    assert result["baseline_rss_mib"] > 0 and result["model_params"] > 0
    assert result["batch"]["rows"] == 2 * result["batch"]["pairs"]
    assert set(result["versions"]) >= {"torch", "transformers", "peft", "bitsandbytes"}
    # Full fine-tuning trains every parameter; the LoRA variants train only adapters.
    trainable = result["trainable_params"]
    assert trainable["full"] == result["model_params"]
    assert 0 < trainable["lora_ref"] == trainable["policy_only"] == trainable["qlora"]
    assert trainable["qlora"] == trainable["qlora_fp32"]
    assert trainable["lora_ref"] < result["model_params"]
