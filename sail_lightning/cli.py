"""The `sail-lightning` command: LightningCLI over SAILModule and PreferenceDataModule."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningCLI

from sail_lightning.callbacks import is_pair_generation
from sail_lightning.data.datamodule import PreferenceDataModule
from sail_lightning.heap import fix_mmap_threshold
from sail_lightning.module import SAILModule
from sail_lightning.resume import check_checkpoint_file

DESCRIPTION = """\
sail-lightning: SAIL and the online DPO family (DPO, IPO, SAIL-DP/PP/PR, online and iterative
DPO, SELM, XPO) as PyTorch Lightning modules.

commands:
  fit            train (sail-lightning fit -c configs/quickstart.yaml)
  validate       evaluate a checkpoint (... validate -c <config> --ckpt_path <file>)
  serve-reward   host a reward model over HTTP (sail-lightning serve-reward --help)
  build-models   train BPE tokenizers and build a small policy and reward model offline
                 (sail-lightning build-models --output models/tiny --train-reward; --help)

Options of a command: `sail-lightning fit --help`; of a callback in the config:
`sail-lightning fit --trainer.callbacks.help sail_lightning.callbacks.PairGenerationCallback`
(also sail_lightning.evaluation.EvaluationCallback, sail_lightning.export.ExportPolicyCallback).
"""



class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with the description's lines kept as written."""


def _tokenizer_name(model_name_or_path: str | None, tokenizer: str | None) -> str | None:
    return tokenizer or model_name_or_path


class SAILCLI(LightningCLI):
    """LightningCLI with the commands that work for this library (``fit``, ``validate``)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # `test` and `predict` need a test_step / forward that SAILModule does not have.
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate")}

    def init_parser(self, **kwargs: Any):
        # No abbreviated options: argparse would read --model.bet=0.5 as --model.beta, so a
        # typo could set a neighbour silently (and a later option could change the meaning).
        kwargs.setdefault("allow_abbrev", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # An empty or cut-off checkpoint fails now, naming it: LightningCLI reads the
        # checkpoint's hparams next, where torch.load would raise a bare EOFError.
        subcommand = self.config.get("subcommand")
        if subcommand:
            check_checkpoint_file(self.config[subcommand].get("ckpt_path"), option="--ckpt_path")

    def add_arguments_to_parser(self, parser) -> None:
        # One tokenizer per run: the model's, handed to the data.
        parser.link_arguments(("model.model_name_or_path", "model.tokenizer"), "data.tokenizer",
                              compute_fn=_tokenizer_name)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        # The module's hparams come from this config under the CLI: name the tokenizer the
        # data was given, or Lightning refuses the two hparams (same key, different values).
        config.model.tokenizer = _tokenizer_name(config.model.model_name_or_path,
                                                 config.model.tokenizer)
        _place_logs(config)


def _place_logs(config: Any) -> None:
    """The default logger (``trainer.logger: true``) is a CSVLogger in
    ``<trainer.default_root_dir>/<method>/version_N``, the method named by
    ``MethodSpec.name``: runs of different methods do not share a folder, and
    ``--trainer.default_root_dir`` moves logs, checkpoints and rounds together."""
    from jsonargparse import Namespace

    from sail_lightning.method import MethodSpec

    trainer = config.trainer
    if trainer.logger is not True:
        return  # a logger the config names, or none
    callbacks = trainer.callbacks or []
    generation = next((dict(c.init_args or {}) for c in callbacks
                       if is_pair_generation(str(getattr(c, "class_path", "")))),
                      None)
    name = MethodSpec.from_options(dict(config.model), dict(config.data), generation).name
    trainer.logger = Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                               init_args=Namespace(save_dir=trainer.default_root_dir or ".",
                                                   name=name))


def main(args: list[str] | None = None) -> None:
    """Run ``sail-lightning <command> ...``; ``args`` replaces ``sys.argv`` (tests).

    ``serve-reward`` (a reward model over HTTP, ``sail_lightning.serving``) and
    ``build-models`` (``sail_lightning.build_models``) are no Lightning subcommands and
    have parsers of their own; ``fit`` and ``validate`` are LightningCLI's.
    """
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "serve-reward":
        from sail_lightning.serving import serve_reward  # litserve loads only for the server

        serve_reward(argv[1:])
        return
    if argv and argv[0] == "build-models":
        from sail_lightning.build_models import main as build_models

        if rc := build_models(argv[1:], prog="sail-lightning build-models"):
            raise SystemExit(rc)
        return
    # Training on CPU frees activations of several MiB each step; left to glibc's default
    # they stay in RSS (sail_lightning.heap: 4.3 GiB instead of 1.5 for a SmolLM2 step).
    fix_mmap_threshold()
    SAILCLI(
        SAILModule,
        PreferenceDataModule,
        seed_everything_default=0,  # an explicit seed: two runs of one config match
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION, "formatter_class": _HelpFormatter},
        args=args,
    )


if __name__ == "__main__":
    main()
