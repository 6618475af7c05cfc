"""The `sail-lightning` command: LightningCLI over SAILModule and PreferenceDataModule."""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from sail_lightning.data.datamodule import PreferenceDataModule
from sail_lightning.module import SAILModule


def _tokenizer_name(model_name_or_path: str | None, tokenizer: str | None) -> str | None:
    return tokenizer or model_name_or_path


class SAILCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # One tokenizer per run: the model's, handed to the data.
        parser.link_arguments(("model.model_name_or_path", "model.tokenizer"), "data.tokenizer",
                              compute_fn=_tokenizer_name)

    def before_instantiate_classes(self) -> None:
        # The module's hparams come from this config under the CLI: name the tokenizer the
        # data was given, or Lightning refuses the two hparams (same key, different values).
        config = self.config[self.subcommand] if self.subcommand else self.config
        config.model.tokenizer = _tokenizer_name(config.model.model_name_or_path,
                                                 config.model.tokenizer)


def main(args: list[str] | None = None) -> None:
    """Run ``sail-lightning <subcommand> ...``; ``args`` replaces ``sys.argv`` (tests).

    ``serve-reward`` (a reward model over HTTP, ``sail_lightning.serving``) is no Lightning
    subcommand and has a parser of its own; every other subcommand is LightningCLI's.
    """
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "serve-reward":
        from sail_lightning.serving import serve_reward  # litserve loads only for the server

        serve_reward(argv[1:])
        return
    SAILCLI(
        SAILModule,
        PreferenceDataModule,
        seed_everything_default=0,  # an explicit seed: two runs of one config match
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
