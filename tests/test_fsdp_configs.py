"""Sharding and real-hardware configs: the FSDP wrap policy, and every config parses."""

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from sail_lightning.cli import main
from sail_lightning.distributed import auto_wrap_policy, decoder_layer_classes, pad_shard
from sail_lightning.models import LoraOptions, add_lora
from tests.conftest import CONFIGS, TINY_CONFIG

QUICK = str(CONFIGS / "quickstart.yaml")
UF = str(CONFIGS / "data" / "ultrafeedback.yaml")
RM = str(CONFIGS / "method" / "sail_pr_rm.yaml")


def tiny(vocab=32):
    cfg = {**TINY_CONFIG, "vocab_size": vocab, "pad_token_id": 0}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))


def wrapped(model):
    policy = auto_wrap_policy(model)
    return {name for name, m in model.named_modules()
            if name and policy(module=m, recurse=False, nonwrapped_numel=0)}


def test_fsdp_wrap_policy_full_finetuning_wraps_decoder_layers_only():
    model = tiny()
    names = wrapped(model)
    assert names == {"model.layers.0", "model.layers.1"}
    assert {c.__name__ for c in decoder_layer_classes(model)} == {"LlamaDecoderLayer"}


def test_fsdp_wrap_policy_lora_gives_trainable_leaves_their_own_units():
    model = add_lora(tiny(), LoraOptions(r=2, alpha=4, dropout=0.0))
    names = wrapped(model)
    assert {n for n in names if n.endswith("layers.0") or n.endswith("layers.1")}
    lora = {n for n in names if "lora_A" in n or "lora_B" in n}
    trainable = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert lora == trainable  # every adapter leaf, and nothing frozen, in its own unit


def test_shard_padding_gives_every_rank_the_same_number_of_items():
    items = list(range(5))
    (a, na), (b, nb) = pad_shard(items, 0, 2), pad_shard(items, 1, 2)
    assert (a, na) == ([0, 2, 4], 3) and (b, nb) == ([1, 3, 3], 2)


def print_config(capsys, *configs, extra=()):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *[f"-c={c}" for c in configs], *extra, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_fsdp_qwen_config_parses(capsys):
    cfg = print_config(capsys, QUICK, CONFIGS / "model/qwen2.5-0.5b.yaml", UF, RM,
                       CONFIGS / "strategy/fsdp.yaml")
    strategy = cfg["trainer"]["strategy"]
    assert strategy["class_path"] == "sail_lightning.distributed.SAILFSDPStrategy"
    assert strategy["init_args"]["checkpoint_layers"] is True
    assert cfg["trainer"]["devices"] == 8 and cfg["trainer"]["precision"] == "bf16-true"
    assert cfg["model"]["model_name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert cfg["model"]["model_config"] is None and cfg["model"]["lora"] is None
    labeller = cfg["trainer"]["callbacks"][1]["init_args"]["labeller"]
    assert labeller["class_path"].endswith("RewardModelLabeller")


def test_fsdp_lora_llama_config_parses(capsys):
    cfg = print_config(capsys, QUICK, CONFIGS / "model/llama-3-8b.yaml", UF, RM,
                       CONFIGS / "strategy/fsdp.yaml")
    assert cfg["model"]["lora"]["r"] == 16 and cfg["model"]["torch_dtype"] == "bfloat16"


def test_qlora_single_gpu_config_parses(capsys):
    cfg = print_config(capsys, QUICK, CONFIGS / "model/llama-3-8b-qlora.yaml", UF, RM)
    assert cfg["model"]["quantization"]["quant_type"] == "nf4"
    assert cfg["model"]["quantization"]["double_quant"] is True
    assert cfg["model"]["lora"]["r"] == 16 and cfg["trainer"]["devices"] == 1


def test_shard_fsdp2_config_parses(capsys):
    cfg = print_config(capsys, QUICK, CONFIGS / "strategy/fsdp2.yaml",
                       extra=["--trainer.devices=2"])
    strategy = cfg["trainer"]["strategy"]
    assert strategy["class_path"].endswith("ModelParallelStrategy")
    assert strategy["init_args"]["tensor_parallel_size"] == 1
    assert strategy["init_args"]["data_parallel_size"] == int(cfg["trainer"]["devices"])


def test_fsdp_strategy_refuses_two_checkpointing_mechanisms():
    from sail_lightning.distributed import SAILFSDPStrategy

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.policy = tiny()

    class Fake(torch.nn.Module):
        hparams = {"gradient_checkpointing": True}

        def __init__(self):
            super().__init__()
            self.pair = Pair()

    strategy = SAILFSDPStrategy(checkpoint_layers=True)
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        strategy._setup_model(Fake())  # the strategy hook Lightning calls (FSDP refuses CPU)


@pytest.mark.parametrize("name", ["SAILFSDPStrategy", "SAILModelParallelStrategy"])
def test_export_callback_refuses_the_sharding_subclasses(name):
    import types

    from sail_lightning import distributed
    from sail_lightning.export import ExportPolicyCallback

    strategy = getattr(distributed, name)()
    with pytest.raises(ValueError, match=name):
        ExportPolicyCallback().setup(types.SimpleNamespace(strategy=strategy), None, "fit")


def test_fsdp1_lora_reference_update_is_refused_before_training():
    from lightning.pytorch.strategies import ModelParallelStrategy

    from sail_lightning.callbacks import check_reference_update
    from sail_lightning.distributed import SAILFSDPStrategy

    with pytest.raises(ValueError, match="update_reference.*fsdp2.yaml"):
        check_reference_update(SAILFSDPStrategy(), lora=True, update_reference=True)
    check_reference_update(SAILFSDPStrategy(), lora=True, update_reference=False)
    check_reference_update(SAILFSDPStrategy(), lora=False, update_reference=True)
    check_reference_update(ModelParallelStrategy(), lora=True, update_reference=True)


def test_fsdp1_like_flat_adapter_shards_make_the_reference_update_fail_loudly():
    # Outside forward, FSDP1 (use_orig_params) leaves each parameter a 1-D view of this
    # rank's shard; copy_ would broadcast it into the reference adapter without a word.
    from sail_lightning.module import SAILModule

    module = SAILModule(model_config=TINY_CONFIG, tokenizer="synthetic", lora=LoraOptions(r=2))
    module.configure_model()
    name, param = next((n, p) for n, p in module.pair.policy.named_parameters()
                       if ".default." in n and "lora_B" in n)
    param.data = param.data.flatten()[: param.shape[-1]].clone()  # broadcastable, wrong
    with pytest.raises(RuntimeError, match="shape.*fsdp2.yaml"):
        module.pair.update_reference()
