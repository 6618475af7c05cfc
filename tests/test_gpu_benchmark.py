"""benchmarks/gpu.py --tiny: the GPU benchmark's code runs on CPU, end to end, and its last
line is the JSON the README reads (the GPU figures themselves need a GPU)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_benchmark_tiny_runs_every_strategy_cpu_allows(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--tiny",
                           "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())
    assert result["device"] == "cpu" and result["engine"] == "hf"  # the default engine
    # FSDP1 needs an accelerator; FSDP2 (ModelParallelStrategy), LoRA and, with
    # bitsandbytes, QLoRA run on CPU through the same Trainer code.
    assert "accelerator" in result["skipped"]["fsdp"]
    ran = {"fsdp2", "lora"} | ({"qlora"} if "qlora" not in result["skipped"] else set())
    assert set(result["runs"]) == ran
    for key in ("train_tokens_per_second", "mfu", "peak_memory_bytes",
                "generation_tokens_per_second"):
        assert set(result[key]) == ran
    for name in ran:
        run = result["runs"][name]
        assert run["train_tokens_per_second"] > 0 and run["generation_tokens_per_second"] > 0
        assert run["generated_tokens"] > 0 and run["mfu"] is None  # no peak known on CPU
        assert run["engine"] == "hf" and run["engine_warmup_seconds"] is None


def test_model_flops_of_qwen25_05b_shape():
    sys.path.insert(0, ROOT)
    from benchmarks.gpu import QWEN25_05B, flops_per_token, matmul_params

    # Qwen2.5-0.5B: 494M parameters, 136M of them the (tied) embedding; every one but the
    # lookup multiplies each token, the output layer included (the tied matrix once more).
    n = matmul_params(QWEN25_05B)
    assert 480e6 < n < 500e6
    assert flops_per_token(QWEN25_05B, 512, lora=False) == 6 * n + 12 * 24 * 896 * 512
    assert flops_per_token(QWEN25_05B, 512, lora=True) == 4 * n + 8 * 24 * 896 * 512


def test_engine_option_and_what_vllm_cannot_run(monkeypatch, capsys):
    sys.path.insert(0, ROOT)
    from benchmarks.gpu import main, parse_args
    from benchmarks.gpu_runs import missing_requirement

    assert parse_args([]).engine == "hf" and parse_args(["--engine", "vllm"]).engine == "vllm"
    with pytest.raises(SystemExit):
        parse_args(["--engine", "sglang"])
    assert "invalid choice: 'sglang'" in capsys.readouterr().err
    # Without vLLM (made unimportable here, as where it is not installed) the benchmark stops
    # before any run trains, naming the extra.
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(SystemExit, match=r"--engine vllm needs vLLM: pip install "
                                         r"'sail-lightning\[vllm\]'"):
        main(["--tiny", "--engine", "vllm", "--runs", "lora"])
    # FSDP1 (the engine's setup refusal) and QLoRA are skipped with the reason; the others run.
    assert "not supported under SAILFSDPStrategy" in missing_requirement("fsdp", "vllm")
    assert "QLoRA is not supported" in missing_requirement("qlora", "vllm")
    for name, engine in (("fsdp2", "vllm"), ("lora", "vllm"), ("fsdp", "hf")):
        assert missing_requirement(name, engine) is None
