"""Checks of what a resume reads, made before any model is built.

A checkpoint named by ``--ckpt_path`` that is empty, cut off (a full disk, a copy
interrupted) or not a checkpoint at all would otherwise fail deep inside ``torch.load``
with a bare ``EOFError`` or ``PytorchStreamReader`` error, after the models were built and
possibly after minutes of loading; the round files a checkpoint names are read with
``data.pool.read_round``, which names the file and line of a cut-off one.
"""

from __future__ import annotations

import os
import zipfile

# Values of --ckpt_path that Lightning resolves itself (no file to check here).
_LIGHTNING_ALIASES = ("last", "best", "hpc", "registry")


def check_checkpoint_file(path: str | os.PathLike | None, *, option: str = "ckpt_path") -> None:
    """Refuses a checkpoint that cannot be a complete one, naming the option and the path.

    A file must be a complete zip archive (``torch.save``'s format, which Lightning writes):
    an empty or truncated file has no zip directory at its end. A folder (a sharded FSDP
    checkpoint) must not be empty. Lightning's aliases (``last``, ``best``...) pass.

    Raises:
        FileNotFoundError: The path does not exist.
        ValueError: The file is empty, cut off or not a checkpoint, or the folder is empty.
    """
    if path is None:
        return
    path = os.fspath(path)
    if path in _LIGHTNING_ALIASES or path.startswith("registry:"):
        return
    if not os.path.exists(path):
        raise FileNotFoundError(f"{option}: no such checkpoint: {path}")
    if os.path.isdir(path):
        if not os.listdir(path):
            raise ValueError(f"{option}: the checkpoint folder {path} is empty")
        return
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{option}: the checkpoint file {path} is empty (0 bytes): a save that "
                         "was interrupted? Resume from an earlier checkpoint")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{option}: {path} ({size} bytes) is not a complete checkpoint: cut "
                         "off (an interrupted save or copy) or another kind of file")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{option}: {path} is a corrupt checkpoint: {exc}") from exc
    if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
        raise ValueError(f"{option}: {path} is a zip archive but not a PyTorch checkpoint "
                         "(no data.pkl)")
