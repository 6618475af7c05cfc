"""Helpers the benchmarks share: quiet logs, library versions, a host-sync counter, and the
commands of a marked block of a doc, run as a user runs them from a clone."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]


def marked_block(marker: str, lang: str | None = "bash") -> re.Pattern:
    """The pattern of a doc's code block between ``<!-- marker -->`` and
    ``<!-- /marker -->`` (the block the doc's tests and benchmarks run as written); its one
    group is the block's body. ``lang``: the block's language (``None``: any)."""
    fence = r"\w*" if lang is None else re.escape(lang)
    return re.compile(rf"<!-- {re.escape(marker)} -->\n```{fence}\n(.*?)```\n"
                      rf"<!-- /{re.escape(marker)} -->", re.S)


def documented_commands(marker: str, text: str) -> list[str]:
    """The commands of ``text``'s one block marked ``marker``, continuation lines joined."""
    (block,) = marked_block(marker).findall(text)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def clone_like(folder: Path) -> None:
    """Makes ``folder`` look like a fresh clone's root to the commands (what they read)."""
    for name in ("configs", "sail_lightning"):
        (folder / name).symlink_to(REPO / name)


def command_env(threads: int | None) -> dict[str, str]:
    """The environment the documented commands run in: this checkout's code first, the
    running Python's scripts (``sail-lightning``) on the PATH, ``OMP_NUM_THREADS`` if given."""
    return {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}),
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                          if p),
            "PATH": os.pathsep.join((os.path.dirname(sys.executable), os.environ["PATH"]))}


def report(out: dict, path: str | None) -> dict:
    """Saves ``out`` as JSON at ``path`` (if given) and prints it as the output's last line,
    the one line a reader or a script takes the figures from."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out), flush=True)
    return out


def quiet() -> None:
    """Keeps stdout for the report: library chatter goes to stderr or is silenced."""
    for name in ("lightning.pytorch", "lightning.fabric", "sail_lightning", "transformers",
                 "accelerate", "trl", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*", ".*in eval mode.*",
                    ".*max_new_tokens.*", ".*experimental.*", ".*TRL.*",
                    ".*smaller than the logging interval.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message=pattern)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def versions() -> dict[str, str | None]:
    """Versions of the libraries a figure depends on (None: not installed)."""
    out: dict[str, str | None] = {"torch": torch.__version__}
    for name in ("transformers", "lightning", "peft", "trl", "bitsandbytes"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # not installed, or broken on this machine: say so, do not fail
            out[name] = None
    return out


class SyncCounter(TorchDispatchMode):
    """Counts the ops that make the host wait for an accelerator: a tensor read as a Python
    value (``bool(t)``, ``.item()``, ``float(t)``), boolean-mask indexing and ``nonzero``
    (data-dependent shapes), and copies from an accelerator to the CPU. On a CPU they cost
    nothing, so the count, not the time, is what a CPU run can show of them."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default or func in (
                torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default):
            self.syncs += 1
        elif func is torch.ops.aten.index.Tensor and any(
                i is not None and i.dtype == torch.bool for i in args[1]):
            self.syncs += 1
        elif (func is torch.ops.aten._to_copy.default and str(kwargs.get("device")) == "cpu"
              and args[0].device.type != "cpu"):
            self.syncs += 1
        return func(*args, **kwargs)


def bench_module(**options):
    """A ``SAILModule`` without the setup-time method check: benchmark batches carry the
    method's routes themselves, with no DataModule or round callback for the check to read.
    The check runs once per fit, not per step, so the steps timed are the library's."""
    from sail_lightning.module import SAILModule

    class BenchModule(SAILModule):
        sync_counter: SyncCounter | None = None  # set: count the host syncs of the steps

        def setup(self, stage: str) -> None:
            pass

        def training_step(self, batch, batch_idx):
            if self.sync_counter is None:
                return super().training_step(batch, batch_idx)
            with self.sync_counter:
                return super().training_step(batch, batch_idx)

    return BenchModule(**options)
