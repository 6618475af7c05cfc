"""Cost of the non-finite guard (sail_lightning/guard.py) per training step, side by side.

Each variant trains the same SAILModule (a fresh Llama from a config: hidden 128, 4 layers,
4 heads, intermediate 512, on the synthetic task's tokenizer; sigmoid DPO, beta 0.1,
batches of 16 pairs) for ``--steps`` steps under a ``lightning.Trainer`` on CPU, with no
logging step inside the timed window (``log_every_n_steps`` above it), so every timed step is
one that needs no sync. Variants run interleaved, ``--repeats`` times each; the figure is the
median step time (wall clock between ``on_train_batch_start`` and ``on_train_batch_end``,
the first 3 steps of each run left out as warm-up) and the host syncs per step, counted by
wrapping ``Tensor.item``, ``__bool__``, ``__float__`` and ``__int__`` during the timed steps
(the calls that make a CUDA device wait; on CPU they cost nothing, so the sync count is the
figure that carries to a GPU, and the time shows the guard's own compute):

- ``guard_fused``: the library as it is: the guard's verdict on the device, fused AdamW
  skipping a bad step with ``found_inf``.
- ``guard_unfused``: the guard with a foreach AdamW (``fused_kwargs`` off): one host sync a
  step to drop a bad step's gradients (the fallback for optimizers without ``found_inf``).
- ``sync_check``: no guard, foreach AdamW, ``bool(torch.isfinite(loss))`` each step: the
  check the library had before (a host sync a step; it raised but did not skip).
- ``none``: no check at all, foreach AdamW: the floor.
- ``none_fused``: no check at all, fused AdamW: the floor of ``guard_fused``.

Syncs are counted on CPU tensors too: a foreach AdamW reads each parameter's step count
with ``.item()`` (a CPU tensor: no device wait on a GPU either), and Lightning makes a few
calls a step, so compare a variant with its floor (``guard_fused`` with ``none_fused``,
``guard_unfused`` and ``sync_check`` with ``none``): the difference is what the check adds.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.nonfinite_guard`` (results in
``benchmarks/results/nonfinite_guard.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import contextmanager

import lightning as L
import torch

import sail_lightning.module as module_file
from sail_lightning.data.datamodule import PreferenceDataModule
from sail_lightning.module import SAILModule

CONFIG = {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 4,
          "num_attention_heads": 4, "intermediate_size": 512, "max_position_embeddings": 64,
          "tie_word_embeddings": False}
VARIANTS = ("guard_fused", "none_fused", "guard_unfused", "sync_check", "none")
_SYNC_CALLS = ("item", "__bool__", "__float__", "__int__")


class NoGuard:
    """Stands in for NonFiniteGuard: checks nothing (``sync_check`` adds the old check)."""

    def __init__(self, sync_check: bool) -> None:
        self.sync_check = sync_check

    def record(self, step, loss, routes, parts=None) -> None:
        if self.sync_check and not torch.isfinite(loss):
            raise FloatingPointError("non-finite loss")

    def before_optimizer_step(self, *args, **kw) -> None:
        pass

    def check(self, **kw) -> None:
        pass


class Timer(L.Callback):
    def __init__(self, counter: dict) -> None:
        self.times: list[float] = []
        self.counter = counter
        self.start = 0.0

    def on_train_batch_start(self, trainer, *args) -> None:
        self.counter["on"] = trainer.global_step >= 3
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step > 3:
            self.times.append(time.perf_counter() - self.start)
        self.counter["on"] = False


@contextmanager
def count_syncs(counter: dict):
    originals = {name: getattr(torch.Tensor, name) for name in _SYNC_CALLS}

    def wrap(name):
        real = originals[name]

        def call(self, *a, **k):
            if counter["on"]:
                counter["syncs"] += 1
            return real(self, *a, **k)
        return call

    for name in _SYNC_CALLS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield
    finally:
        for name, real in originals.items():
            setattr(torch.Tensor, name, real)


def run(variant: str, steps: int, dm: PreferenceDataModule) -> dict:
    torch.manual_seed(0)
    model = SAILModule(model_config=CONFIG, tokenizer="synthetic", lr=1e-4, beta=0.1)
    if variant in ("sync_check", "none", "none_fused"):
        model.guard = NoGuard(sync_check=variant == "sync_check")
    fused = module_file.fused_kwargs
    if variant not in ("guard_fused", "none_fused"):
        module_file.fused_kwargs = lambda params, plugin=None: {}
    counter = {"on": False, "syncs": 0}
    timer = Timer(counter)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=steps,
                        limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=10 * steps, callbacks=[timer])
    try:
        with count_syncs(counter):
            trainer.fit(model, datamodule=dm)
    finally:
        module_file.fused_kwargs = fused
    return {"median_step_ms": 1000 * statistics.median(timer.times),
            "syncs_per_step": counter["syncs"] / max(1, steps - 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "nonfinite_guard.json"))
    args = parser.parse_args(argv)
    dm = PreferenceDataModule(tokenizer="synthetic", num_synthetic_pairs=1000, batch_size=16,
                              max_prompt_length=16, max_response_length=16)
    dm.setup("fit")
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for variant in VARIANTS:  # interleaved: drift on a shared machine hits all alike
            results[variant].append(run(variant, args.steps, dm))
    summary = {v: {"median_step_ms": statistics.median(r["median_step_ms"] for r in rs),
                   "syncs_per_step": statistics.median(r["syncs_per_step"] for r in rs)}
               for v, rs in results.items()}
    for v in VARIANTS:
        floor = summary["none_fused" if v in ("guard_fused", "none_fused") else "none"]
        summary[v]["time_vs_floor"] = summary[v]["median_step_ms"] / floor["median_step_ms"]
        summary[v]["syncs_added"] = summary[v]["syncs_per_step"] - floor["syncs_per_step"]
    out = {"config": {**vars(args), "model": CONFIG, "batch_size": 16,
                      "torch": torch.__version__, "threads": torch.get_num_threads()},
           "summary": summary, "runs": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
