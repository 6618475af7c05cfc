"""Keep a CPU run's resident memory at what its tensors hold: glibc's mmap threshold.

glibc serves a block of at least its mmap threshold with ``mmap`` and gives it back to the
OS on free; smaller blocks come from its heap, which rarely shrinks. By default the threshold
rises after each large free, up to 32 MiB, so after the first training step most activations
(a 135M model's are 7-19 MiB each at batch 8 x 192 tokens) live in the heap and stay in RSS
once freed, fragmented. Measured on SmolLM2-135M-Instruct with LoRA, gradient checkpointing
and chunked log-probs (``benchmarks/real_model.py --memory``): a training step (8 pairs, 16
sequences of 192 tokens) peaked at 4.8 GiB RSS with glibc's default and 1.5 GiB with the
threshold fixed at 1 MiB (``benchmarks/results/real_model_memory.json``). The same run
timed the step at 21 s and 33 s, on a machine shared with other jobs: the cost in time (an
mmap and page faults per large tensor) is not measured quietly yet.
``MALLOC_MMAP_THRESHOLD_=<bytes>`` in the environment overrides it; a Python API user calls
:func:`fix_mmap_threshold` before training.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("sail_lightning.heap")

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def fix_mmap_threshold(nbytes: int = 2**20) -> int | None:
    """Makes glibc serve blocks of ``nbytes`` or more with mmap, returned to the OS when
    freed, and stops it from raising that threshold.

    Not done when ``MALLOC_MMAP_THRESHOLD_`` is set (the user chose) or where the C library
    is not glibc (macOS, musl). Returns the threshold set, or None.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        if libc.mallopt(_M_MMAP_THRESHOLD, nbytes) != 1:
            return None
    except (OSError, AttributeError):
        return None
    log.debug("glibc mmap threshold fixed at %d bytes", nbytes)
    return nbytes
