"""The `sail-lightning` command: LightningCLI over SAILModule and PreferenceDataModule."""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from jsonargparse import ArgumentParser, DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from sail_lightning.callbacks import is_pair_generation
from sail_lightning.data.datamodule import PreferenceDataModule
from sail_lightning.heap import fix_mmap_threshold
from sail_lightning.module import SAILModule
from sail_lightning.resume import check_checkpoint_file
from sail_lightning.run_folder import (
    checkpoint_step,
    expect_earlier_checkpoints,
    remove_if_unused,
    resumed_version,
)

DESCRIPTION = """\
sail-lightning: SAIL and the online DPO family (DPO, IPO, SAIL-DP/PP/PR, online and iterative
DPO, SELM, XPO) as PyTorch Lightning modules.

commands:
  fit            train (sail-lightning fit -c configs/quickstart.yaml)
  validate       evaluate a checkpoint (... validate -c <config> --ckpt_path <file>)
  serve-reward   host a reward model over HTTP (sail-lightning serve-reward --help)
  serve-judge    host a causal LM's chat completions on the OpenAI protocol, a local judge
                 for JudgeLabeller (sail-lightning serve-judge --help)
  build-models   train BPE tokenizers and build a small policy and reward model offline
                 (sail-lightning build-models --output models/tiny --train-reward; --help)

Options of a command: `sail-lightning fit --help`; of a callback in the config:
`sail-lightning fit --trainer.callbacks.help sail_lightning.callbacks.PairGenerationCallback`
(also sail_lightning.evaluation.EvaluationCallback, sail_lightning.export.ExportPolicyCallback).
"""



# Commands with parsers of their own (main() dispatches them), shown in the top-level help.
OTHER_COMMANDS = {
    "serve-reward": "Host a reward model over HTTP (sail-lightning serve-reward --help).",
    "serve-judge": "Host a causal LM's chat completions on the OpenAI protocol, a local judge "
                   "(sail-lightning serve-judge --help).",
    "build-models": "Train BPE tokenizers and build a small policy and reward model offline "
                    "(sail-lightning build-models --help).",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with the description's lines kept as written."""


def _tokenizer_name(model_name_or_path: str | None, tokenizer: str | None) -> str | None:
    return tokenizer or model_name_or_path


_PYTHONPATH_HINT = ("a module in a folder of your own needs that folder on PYTHONPATH, e.g. "
                    "PYTHONPATH=examples sail-lightning fit ...")
_NO_MODULE = re.compile(r"No module named '([^']+)'")
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)':\s*No module named '([^']+)'")


def _import_hint(message: str) -> str | None:
    """The one line that matters in jsonargparse's report of an unimportable class or
    function (a user's labeller without PYTHONPATH), or None for other errors."""
    if "PYTHONPATH" in message:  # resolve_callable's own message: its first line says it all
        return next(line.strip() for line in message.splitlines() if "PYTHONPATH" in line)
    if match := _CLASS_PATH.search(message):
        return (f"cannot import class_path {match[1]!r}: no module named {match[2]!r} "
                f"({_PYTHONPATH_HINT})")
    if match := _NO_MODULE.search(message):
        return f"no module named {match[1]!r} ({_PYTHONPATH_HINT})"
    return None


class _ArgumentParser(LightningArgumentParser):
    """Ends a parse error about an unimportable module with the line saying so: jsonargparse
    reports it deep inside a tree of union alternatives (line 40 of 150)."""

    def error(self, message: str, ex: Exception | None = None):
        hint = _import_hint(message)
        return super().error(f"{message}\n{hint}" if hint else message, ex)


class _SaveConfigToRun(SaveConfigCallback):
    """Saves ``config.yaml`` in the run's own folder (``run_folder.run_dir``) where that is
    not the logger's ``log_dir``: a W&B logger's is its ``save_dir``, shared by every run,
    where each run would overwrite the last one's config."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        from sail_lightning.run_folder import run_dir

        folder = run_dir(trainer) if trainer.loggers else None
        if self.already_saved or folder is None or folder == trainer.log_dir:
            return super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero:
            os.makedirs(folder, exist_ok=True)
            self.parser.save(self.config, os.path.join(folder, self.config_filename),
                             skip_none=False, overwrite=True, multifile=self.multifile)
        self.already_saved = trainer.strategy.broadcast(True)


class SAILCLI(LightningCLI):
    """LightningCLI with the commands that work for this library (``fit``, ``validate``)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # `test` and `predict` need a test_step / forward that SAILModule does not have.
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate")}

    def _add_subcommands(self, parser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        # Listed in the usage line and under "subcommands" of the top-level help; main()
        # runs them with their own parsers before LightningCLI is reached.
        for name, help_ in OTHER_COMMANDS.items():
            parser._subcommands_action.add_subcommand(
                name, ArgumentParser(prog=f"sail-lightning {name}"), help=help_)

    def init_parser(self, **kwargs: Any):
        # No abbreviated options: argparse would read --model.bet=0.5 as --model.beta, so a
        # typo could set a neighbour silently (and a later option could change the meaning).
        kwargs.setdefault("allow_abbrev", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        # What the command line itself gives (not the config files): see _follow_the_model.
        self._command_line = list(sys.argv[1:] if args is None else
                                  args if isinstance(args, (list, tuple)) else [])
        super().parse_arguments(parser, args)
        # An empty or cut-off checkpoint fails now, naming it: LightningCLI reads the
        # checkpoint's hparams next, where torch.load would raise a bare EOFError.
        subcommand = self.config.get("subcommand")
        if subcommand:
            check_checkpoint_file(self.config[subcommand].get("ckpt_path"), option="--ckpt_path")

    def add_arguments_to_parser(self, parser) -> None:
        # Results on the console: a line per epoch and one at the end (--summary.*).
        from sail_lightning.summary import ConsoleSummary

        parser.add_lightning_class_args(ConsoleSummary, "summary")
        # One tokenizer per run: the model's, handed to the data.
        parser.link_arguments(("model.model_name_or_path", "model.tokenizer"), "data.tokenizer",
                              compute_fn=_tokenizer_name)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as e:
            # A labeller's `fn: "my_module:score"` fails here, the helpful ImportError at the
            # bottom of a chain of jsonargparse's union errors: raise it alone, last.
            cause: BaseException | None = e
            while cause is not None and not isinstance(cause, ImportError):
                cause = cause.__cause__ or cause.__context__
            hint = _import_hint(str(cause)) if cause is not None else None
            if hint is None:
                raise
            raise ImportError(hint) from None

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            # A run that fails while starting leaves no version folder holding only its
            # config: the next run would otherwise be version_N+1 beside an empty one.
            trainer = getattr(self, "trainer", None)
            if trainer is not None and trainer.is_global_zero and trainer.global_step == 0:
                remove_if_unused(trainer.log_dir)
            raise

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        _follow_the_model(config, getattr(self, "_command_line", []))
        # The module's hparams come from this config under the CLI: name the tokenizer the
        # data was given, or Lightning refuses the two hparams (same key, different values).
        config.model.tokenizer = _tokenizer_name(config.model.model_name_or_path,
                                                 config.model.tokenizer)
        _place_logs(config, resuming=self.subcommand == "fit")


def _follow_the_model(config: Any, command_line: list[str]) -> None:
    """``model.tokenizer: synthetic`` is the quickstart's tokenizer for its fresh
    ``model_config`` model; a model given by path on top of the quickstart
    (``--model.model_config=null --model.model_name_or_path=PATH``) takes its own tokenizer
    instead, with a warning, unless the command line names ``--model.tokenizer``. A local
    folder without tokenizer files keeps it (the vocabulary check then refuses a mismatch)."""

    from lightning.pytorch.utilities import rank_zero_warn

    from sail_lightning.tokenizer import SYNTHETIC_TOKENIZER, build_tokenizer

    model = config.model
    path = model.model_name_or_path
    if not path or model.model_config is not None or model.tokenizer != SYNTHETIC_TOKENIZER:
        return
    if any(a == "--model.tokenizer" or a.startswith("--model.tokenizer=") for a in command_line):
        return  # asked for on the command line: kept
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        if not any(os.path.exists(os.path.join(local, f))
                   for f in ("tokenizer.json", "tokenizer_config.json")):
            return
        # A quickstart model saved with its tokenizer (export, the README's round trip):
        # the same vocabulary, nothing to change or say.
        if build_tokenizer(local).get_vocab() == build_tokenizer(SYNTHETIC_TOKENIZER).get_vocab():
            return
    rank_zero_warn(
        f"model.tokenizer: {SYNTHETIC_TOKENIZER!r} (the quickstart's, for its fresh "
        f"model_config) replaced by the tokenizer of model.model_name_or_path={path!r}; "
        f"pass --model.tokenizer={SYNTHETIC_TOKENIZER} to keep it, or another name or path")
    model.tokenizer = None
    if "tokenizer" in config.data:
        config.data.tokenizer = path


def _place_logs(config: Any, resuming: bool = False) -> None:
    """The default logger (``trainer.logger: true``) is a CSVLogger in
    ``<trainer.default_root_dir>/<method>/version_N``, the method named by
    ``MethodSpec.name``: runs of different methods do not share a folder, and
    ``--trainer.default_root_dir`` moves logs, checkpoints and rounds together. A run resumed
    from a checkpoint in ``.../version_N/checkpoints/`` continues ``version_N``
    (``run_folder``); ``validate`` of a checkpoint logs to a new folder (``resuming`` False),
    leaving the training run's metrics as they are."""
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
    save_dir = trainer.default_root_dir or "."
    version = resumed_version(config.get("ckpt_path"), save_dir, name) if resuming else None
    if version is None:
        trainer.logger = Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                                   init_args=Namespace(save_dir=save_dir, name=name))
        return
    # Resumed from a checkpoint of this run's own folder: the folder continues.
    expect_earlier_checkpoints()
    trainer.logger = Namespace(
        class_path="sail_lightning.run_folder.RunCSVLogger",
        init_args=Namespace(save_dir=save_dir, name=name, version=version,
                            resume_step=checkpoint_step(config.ckpt_path)))


def main(args: list[str] | None = None) -> None:
    """Run ``sail-lightning <command> ...``; ``args`` replaces ``sys.argv`` (tests).

    ``serve-reward`` (a reward model over HTTP, ``sail_lightning.serving``),
    ``serve-judge`` (a chat model on the OpenAI protocol, ``sail_lightning.judge_serving``) and
    ``build-models`` (``sail_lightning.build_models``) are no Lightning subcommands and
    have parsers of their own; ``fit`` and ``validate`` are LightningCLI's.
    """
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "serve-reward":
        from sail_lightning.serving import serve_reward  # litserve loads only for the server

        serve_reward(argv[1:])
        return
    if argv and argv[0] == "serve-judge":
        from sail_lightning.judge_serving import serve_judge  # litserve: for the server only

        serve_judge(argv[1:])
        return
    if argv and argv[0] == "build-models":
        from sail_lightning.build_models import main as build_models

        if rc := build_models(argv[1:], prog="sail-lightning build-models"):
            raise SystemExit(rc)
        return
    # Training on CPU frees activations of several MiB each step; left to glibc's default
    # they stay in RSS (sail_lightning.heap: 4.8 GiB instead of 1.5 for a SmolLM2 step).
    fix_mmap_threshold()
    SAILCLI(
        SAILModule,
        PreferenceDataModule,
        seed_everything_default=0,  # an explicit seed: two runs of one config match
        save_config_kwargs={"overwrite": True},
        parser_class=_ArgumentParser,
        save_config_callback=_SaveConfigToRun,
        parser_kwargs={"prog": "sail-lightning", "description": DESCRIPTION,
                       "formatter_class": _HelpFormatter},
        args=args,
    )


if __name__ == "__main__":
    main()
