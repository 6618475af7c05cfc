"""A fit with sampling.engine=vllm from the CLI, and its exact resume (``-m vllm``, second
environment: ``.ci/vllm-tests.sh``).

The fits run in this process (``cli.main``), so they share the process's one engine with
``test_vllm_engine.py`` (same model config).
"""

import json

import pytest
import yaml

from sail_lightning.cli import main
from tests.conftest import CONFIGS
from tests.test_vllm_engine import VLLM_CONFIG

pytestmark = pytest.mark.vllm


def _overlay(tmp_path, name: str, *extra: dict):
    root = tmp_path / name
    cfg = {
        "trainer": {
            "default_root_dir": str(root), "max_epochs": 3, "limit_val_batches": 2,
            "limit_train_batches": 6, "enable_progress_bar": False, "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(root), "name": "csv"}},
            "callbacks": [
                {"class_path": "sail_lightning.evaluation.EvaluationCallback",
                 "init_args": {"num_prompts": 16, "max_new_tokens": 8, "engine": "vllm"}},
                {"class_path": "sail_lightning.callbacks.PairGenerationCallback",
                 "init_args": {"progress": False, "sampling": {
                     "num_samples": 2, "max_new_tokens": 8, "engine": "vllm"}}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"every_n_train_steps": 2, "save_last": True, "save_top_k": 0}},
                {"class_path": "tests.helpers.DumpPool", "init_args": {"path": str(root / "pool")}},
                *extra,
            ],
        },
        "model": {"model_config": VLLM_CONFIG},
        "data": {"num_synthetic_pairs": 200},
    }
    path = tmp_path / f"{name}-{len(extra)}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return ["fit", "-c", str(CONFIGS / "quickstart.yaml"), "-c", str(path)]


def _rounds(tmp_path, name: str) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((tmp_path / name).rglob("round_*.jsonl"))}


def _losses(tmp_path, name: str) -> list[float]:
    return json.loads((tmp_path / name / "pool" / "rank0.json").read_text())["losses"]


def test_fit_with_vllm_resumes_exactly_without_regenerating(tmp_path):
    main(_overlay(tmp_path, "full"))
    full = _rounds(tmp_path, "full")
    assert sorted(full) == [f"round_{k:04d}.jsonl" for k in range(3)]
    assert all(text.strip() for text in full.values())
    # 6 steps per epoch: a crash after step 9, in epoch 1 (round 1 written; checkpoint at 8).
    crash = {"class_path": "tests.helpers.RaiseAt", "init_args": {"step": 9}}
    with pytest.raises(RuntimeError, match="killed after step 9"):
        main(_overlay(tmp_path, "run", crash))
    files = sorted((tmp_path / "run").rglob("round_*.jsonl"))
    assert [p.name for p in files] == ["round_0000.jsonl", "round_0001.jsonl"]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    last = tmp_path / "run" / "csv" / "version_0" / "checkpoints" / "last.ckpt"
    main([*_overlay(tmp_path, "run"), f"--ckpt_path={last}"])
    # The written rounds were read back, neither regenerated nor rewritten; round 2 was
    # generated as the uninterrupted run generated it: same weights, same seed.
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    assert _rounds(tmp_path, "run") == full
    assert _losses(tmp_path, "run") == _losses(tmp_path, "full")[8:]
