"""What ``OMP_NUM_THREADS`` does to a small model's training on a CPU, quiet and contended.

torch uses one thread per core unless ``OMP_NUM_THREADS`` says otherwise; sail-lightning sets
no thread count (as Lightning does not for one process). On a machine whose cores are busy
with other work, those threads wait on each other (OpenMP spins at its barriers while
another process holds a core), and small models, whose operations are too short to gain
from a second thread, lose the most. This script times the quickstart's workload, training
steps of its tiny Llama (AdamW, batches of 64 sequences of 32 tokens) and a sampled round
(128 prompts, 12 new tokens), in a fresh process per setting:

- ``OMP_NUM_THREADS`` = 1 and = the number of cores;
- the machine as it is, and with one busy-looping process per core beside it (what a
  second job, or another user's, does to the run).

    python benchmarks/threads.py [--steps 60] [--out benchmarks/results/threads.json]

The load average at each measurement is recorded with it: on a shared machine the "as it
is" figures include whatever else ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORKLOAD = r"""
import json, sys, time
import torch
from transformers import AutoConfig, AutoModelForCausalLM
steps = int(sys.argv[1])
torch.manual_seed(0)
config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=256,
                              max_position_embeddings=64, tie_word_embeddings=False)
model = AutoModelForCausalLM.from_config(config)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
ids = torch.randint(3, 64, (64, 32))
start = time.perf_counter()
for _ in range(steps):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
train = time.perf_counter() - start
start = time.perf_counter()
with torch.no_grad():
    model.generate(input_ids=torch.randint(3, 64, (128, 16)), max_new_tokens=12,
                   do_sample=True, pad_token_id=0, eos_token_id=None)
print(json.dumps({"train_s": round(train, 2), "round_s": round(time.perf_counter() - start, 2),
                  "threads": torch.get_num_threads()}))
"""


def measure(threads: int, steps: int, hogs: int) -> dict:
    """One setting in a fresh process, with ``hogs`` busy-looping processes beside it."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
    try:
        load = os.getloadavg()[0]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run([sys.executable, "-c", WORKLOAD, str(steps)], env=env,
                             capture_output=True, text=True, check=True)
    finally:
        for proc in busy:  # only the processes started here
            proc.kill()
            proc.wait()
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"omp_num_threads": threads, "busy_processes": hogs,
            "load_average_1min": round(load, 2), **result}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "threads.json"))
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    runs = [measure(threads, args.steps, hogs)
            for hogs in (0, cores) for threads in sorted({1, cores})]
    results = {"cores": cores, "steps": args.steps, "runs": runs,
               "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
