"""The README's "Real model on CPU" block, run as written, and the memory of its training step.

Default: runs the commands between the README's ``<!-- real-model-command -->`` markers in a
shell (all but its install line: this checkout is installed already), from a fresh folder
laid out as a clone's root (``configs/`` and ``sail_lightning/`` linked), and records each
command's wall time, CPU time and peak resident memory (the child's own ``wait4`` figure: its
largest process), then the figures the README quotes: the exact reward of each round's
samples, the held-out evaluation before (the reference: the starting model) and after, and
the first held-out prompt's responses. Writes
``benchmarks/results/real_model.json``::

    python benchmarks/real_model.py [--threads N] [--keep DIR] [--model-dir DIR]

``--model-dir`` links an already converted ``models/smollm2`` instead of converting again
(the conversion command is then skipped and not timed).

``--memory``: one SAIL training step of SmolLM2-135M-Instruct (the README block's: LoRA r 8,
batch 8 pairs of 128 prompt + 64 response tokens), each variant in its own process, side by
side: full logits or chunked, gradient checkpointing off or on, glibc's default heap or the
mmap threshold the CLI fixes (``sail_lightning.heap``). Peak RSS and step time, in
``benchmarks/results/real_model_memory.json``::

    python benchmarks/real_model.py --memory --model-dir models/smollm2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The checkout this script is in, first: its sail_lightning and benchmarks package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_utils  # noqa: E402
from benchmarks.bench_utils import REPO, clone_like, command_env  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
MARKER = "real-model-command"


def documented_commands(text: str | None = None) -> list[str]:
    """The commands of the README's marked block (or of ``text``)."""
    text = (REPO / "README.md").read_text() if text is None else text
    return bench_utils.documented_commands(MARKER, text)


def timed(command: str, cwd: Path, env: dict) -> dict:
    """Runs ``command`` in a shell; its wall and CPU seconds and peak RSS (MiB)."""
    start = time.perf_counter()
    with open(cwd / "commands.log", "a") as log:
        log.write(f"$ {command}\n")
        log.flush()
        proc = subprocess.Popen(command, shell=True, cwd=cwd, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        tail = (cwd / "commands.log").read_text()[-4000:]
        raise RuntimeError(f"{command} failed ({proc.returncode}):\n{tail}")
    return {"command": command, "wall_s": round(time.perf_counter() - start, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def run(folder: Path, threads: int, model_dir: str | None) -> dict:
    clone_like(folder)
    if model_dir:
        (folder / "models").mkdir()
        (folder / "models" / "smollm2").symlink_to(Path(model_dir).resolve())
    env = command_env(threads)
    steps = []
    for command in documented_commands():
        # The install line installs this checkout: done already (the benchmark imports it).
        if command.startswith("pip install") or (model_dir and "--from-gguf" in command):
            continue
        steps.append(timed(command, folder, env))
    return summarize(folder, steps, threads)


def summarize(folder: Path, steps: list[dict], threads: int) -> dict:
    (log,) = folder.glob("runs/smollm2/*/version_*/metrics.csv")
    rows = list(csv.DictReader(log.open()))

    def column(key):
        return [round(float(r[key]), 4) for r in rows if r.get(key)]

    (samples,) = log.parent.glob("eval/epoch_*.jsonl")
    evaluated = [json.loads(line) for line in samples.read_text().splitlines()]
    first = evaluated[0]
    return {
        "threads": threads, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average_at_end": os.getloadavg(), "steps": steps,
        "total_wall_s": round(sum(s["wall_s"] for s in steps), 1),
        "peak_rss_mib": max(s["peak_rss_mib"] for s in steps),
        "rounds": {key: column(key) for key in (
            "gen/reward_mean", "gen/mean_length", "gen/eos_rate", "gen/tokens_per_second",
            "gen/generation_seconds", "gen/reference_seconds", "gen/reused_slots")},
        "evaluation": {key: column(key) for key in (
            "val/ref_eval_reward", "val/eval_reward", "val/win_rate_vs_ref", "val/kl",
            "val/mean_length")},
        "evaluated_prompts": len(evaluated),
        "sample": {"prompt": first["prompt"], "before": first["reference_response"],
                   "before_score": first["reference_score"], "after": first["response"],
                   "after_score": first["score"]},
        "adapter_files": sorted(p.name for p in log.parent.glob("policy/*")),
    }


# -- --memory: one step, variant by variant -----------------------------------------------

VARIANTS = {  # name: (gradient checkpointing, logprob_chunk_size, fixed mmap threshold)
    "full_logits": (False, 0, False),
    "chunked": (False, 256, False),
    "checkpointing": (True, 0, False),
    "checkpointing_chunked": (True, 256, False),
    "checkpointing_chunked_heap": (True, 256, True),  # what configs/smollm2.yaml runs
}


def step_worker(model_dir: str, variant: str) -> dict:
    """One warm-up and one timed SAIL-PR step in this process; its peak RSS."""
    import torch

    from sail_lightning.heap import fix_mmap_threshold
    from sail_lightning.models import LoraOptions
    from sail_lightning.module import SAILModule

    checkpointing, chunk, heap = VARIANTS[variant]
    if heap:
        fix_mmap_threshold()
    torch.manual_seed(0)
    module = SAILModule(model_name_or_path=model_dir, lora=LoraOptions(r=8, alpha=16, dropout=0.0),
                        gradient_checkpointing=checkpointing, logprob_chunk_size=chunk, lr=1e-4)
    module.configure_model()
    pairs, prompt, response = 8, 128, 64
    ids = torch.randint(100, module.pair.policy.config.vocab_size - 100,
                        (2 * pairs, prompt + response))
    mask = torch.zeros_like(ids)
    mask[:, prompt:] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": mask}
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        policy, reference = module.logprobs(batch)
        margin = (policy[:pairs] - reference[:pairs]) - (policy[pairs:] - reference[pairs:])
        loss = -torch.nn.functional.logsigmoid(0.1 * margin).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - start)
    return {"variant": variant, "gradient_checkpointing": checkpointing,
            "logprob_chunk_size": chunk, "fixed_mmap_threshold": heap,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "step_s": round(seconds[-1], 1)}


def memory(model_dir: str, threads: int) -> dict:
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}),
           "PYTHONPATH": str(REPO)}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    rows = []
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--worker", variant, "--model-dir",
                              model_dir], env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return {"threads": threads, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "load_average_at_end": os.getloadavg(), "batch": "8 pairs x (128 + 64) tokens",
            "variants": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS (default: as the "
                        "environment has it, as a user runs the README)")
    parser.add_argument("--keep", help="run in this (new) folder and keep it")
    parser.add_argument("--model-dir", help="an already converted SmolLM2 folder")
    parser.add_argument("--memory", action="store_true", help="the step's memory, by variant")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(step_worker(args.model_dir, args.worker)))
        return {}
    if args.memory:
        if not args.model_dir:
            parser.error("--memory needs --model-dir (build-models --from-gguf writes one)")
        results = memory(args.model_dir, args.threads)
        out = args.out or RESULTS / "real_model_memory.json"
    elif args.keep:
        Path(args.keep).mkdir(parents=True)
        results = run(Path(args.keep), args.threads, args.model_dir)
        out = args.out or RESULTS / "real_model.json"
    else:
        with tempfile.TemporaryDirectory() as folder:
            results = run(Path(folder), args.threads, args.model_dir)
        out = args.out or RESULTS / "real_model.json"
    Path(out).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(results, ensure_ascii=False))
    return results


if __name__ == "__main__":
    main()
