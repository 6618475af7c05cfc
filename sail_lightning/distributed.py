"""Sharding: FSDP1 (Lightning's FSDPStrategy, the A100 path) and FSDP2 (``fully_shard``).

Each workaround here has a one-line reason; everything distributed lives in this file.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn


def decoder_layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The model's decoder-layer classes, from HF's ``_no_split_modules`` (one FSDP unit each)."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def has_frozen_parameters(model: nn.Module) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def auto_wrap_policy(model: nn.Module):
    """An FSDP1 auto-wrap policy for this model.

    One unit per decoder layer. Under LoRA (frozen base weights), also one unit per leaf
    with trainable weights (peft's policy): frozen and trainable parameters in one flat
    parameter make FSDP keep gradients and optimizer state for the whole unit.
    """
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    layers = decoder_layer_classes(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} declares no `_no_split_modules`: pass "
                         "auto_wrap_policy to the strategy")
    if has_frozen_parameters(model) and hasattr(model, "peft_config"):
        from peft.utils.other import fsdp_auto_wrap_policy

        return fsdp_auto_wrap_policy(model)
    return functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layers)


class SAILFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` with the wrap policy derived from the policy model.

    The auto-wrap policy (decoder layers; LoRA-aware under peft) and, with
    ``checkpoint_layers=True``, activation checkpointing of the decoder layers are chosen
    at setup from the model itself, so one config serves Llama, Qwen2, Mistral, Phi-3...
    Activation checkpointing goes through FSDP only: ``model.gradient_checkpointing``
    must then be off (two mechanisms on one layer recompute twice or fail).

    Args:
        checkpoint_layers: activation checkpointing of every decoder layer.
        **kwargs: ``FSDPStrategy`` arguments (``sharding_strategy``, ``state_dict_type``...).
    """

    def __init__(self, checkpoint_layers: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.checkpoint_layers = checkpoint_layers

    def _setup_model(self, model: nn.Module) -> nn.Module:
        pair = getattr(model, "pair", None)  # a SAILModule: wrap by its policy's layers
        policy_model = pair.policy if pair is not None else model
        if "auto_wrap_policy" not in self.kwargs:
            self.kwargs["auto_wrap_policy"] = auto_wrap_policy(policy_model)
        # Frozen and trainable parameters may still share units (e.g. the root).
        self.kwargs.setdefault("use_orig_params", True)
        if self.checkpoint_layers:
            hp = getattr(model, "hparams", {})
            if hp.get("gradient_checkpointing"):
                raise ValueError("strategy.checkpoint_layers and model.gradient_checkpointing "
                                 "are two activation-checkpointing mechanisms: use one")
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            layers = decoder_layer_classes(policy_model)
            self._activation_checkpointing_kwargs = {"auto_wrap_policy": ModuleWrapPolicy(layers)}
        # FSDPStrategy's own (protected) hook, overridden to add the policy's layers above.
        return super()._setup_model(model)


def shard_fsdp2(model: nn.Module, mesh) -> None:
    """FSDP2: ``fully_shard`` each decoder layer, then the model (call in configure_model)."""
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layer_classes(model)
    for module in list(model.modules()):
        if type(module) in layers:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


class SAILModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2) that resumes from lean checkpoints.

    Lightning reads a distributed checkpoint (a folder) strictly whatever ``strict_loading``
    says (Lightning issue #20274), so the frozen weights that ``SAILModule`` leaves out of
    checkpoints fail the load; here only the saved weights are read. Both formats (folder,
    or one file with ``save_distributed_checkpoint=False``) first go through
    ``PolicyPair.check_checkpoint``: under this strategy ``on_load_checkpoint`` gets no
    weights, so it could neither require the trainable ones nor restore the reference flag.
    """

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        path = Path(self.broadcast(checkpoint_path))
        module = self.lightning_module
        if not path.is_dir():  # one file: Lightning loads it non-strictly already
            saved = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
            module.pair.check_checkpoint(saved["state_dict"].keys(), saved)
            return super().load_checkpoint(path, weights_only)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        metadata = torch.load(path / "meta.pt", weights_only=weights_only)  # Lightning's name
        stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        saved = {k.removeprefix("state_dict.") for k in stored if k.startswith("state_dict.")}
        module.pair.check_checkpoint(saved, metadata)
        weights = {k: v for k, v in get_model_state_dict(self.model).items() if k in saved}
        dcp.load({"state_dict": weights}, checkpoint_id=path)
        self.model.load_state_dict(weights, strict=False)
        for i, optimizer in enumerate(self.optimizers):
            state = {f"optimizer_{i}": get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, state[f"optimizer_{i}"])
        return metadata  # what Lightning returns: everything but weights and optimizers


def is_sharded(trainer) -> bool:
    """Whether parameters are sharded across ranks (then every rank must run every forward)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = getattr(trainer.strategy, "model", None)
    if model is None:
        return False
    if isinstance(model, FullyShardedDataParallel):
        return True
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def generation_context(trainer):
    """Full parameters for ``generate()`` under FSDP1, gathered once per round.

    FSDP1 outside its root forward fails ("'weight' must be 2-D"); summoning the root's
    parameters (not recursively: the layers gather themselves in their forwards) fixes it.
    FSDP2 gathers in each module's forward hooks: nothing to do.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = getattr(trainer.strategy, "model", None)
    if isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False):
            yield
    else:
        yield


def pad_shard(items: list, rank: int, world: int) -> tuple[list, int]:
    """This rank's strided shard, padded to the longest shard's length by repeating its
    last item: under sharding every rank must run the same number of forwards, or the
    collectives inside them deadlock. Returns (padded shard, number of real items)."""
    shard = items[rank::world]
    longest = -(-len(items) // world) if items else 0
    real = len(shard)
    if shard and real < longest:
        shard = shard + [shard[-1]] * (longest - real)
    return shard, real


def synced_generation(trainer) -> bool:
    """``synced_gpus`` for ``generate()``: ranks that finish early keep stepping."""
    return trainer.world_size > 1 and is_sharded(trainer) and torch.distributed.is_initialized()


def all_gather_objects(obj: list, world_size: int) -> list:
    """Python objects from every rank, in rank order (each rank holds the same list)."""
    dist = torch.distributed
    if world_size == 1 or not dist.is_available() or not dist.is_initialized():
        return obj
    out: list = [None] * world_size
    dist.all_gather_object(out, obj[0])
    return out
