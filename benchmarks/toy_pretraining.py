"""Does the toy pretraining converge on any machine? Held-out accuracy and time per seed and thread count.

Each run is a fresh process with ``OMP_NUM_THREADS`` set and an empty cache, calling
``pretrained_toy_model_path`` with the default settings (only the seed changes), so it measures
exactly what a new user's first run does. Floating-point results depend on the thread count,
so the same seed is run at each thread count.

    python benchmarks/toy_pretraining.py --seed 0 1 --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from harness import RESULTS, ROOT, add_common_flags, apply_common_flags, recording

WORKER = """
import json, sys, time
from peft_trl_testbed import PretrainConfig, pretrain_metrics, pretrained_toy_model_path
start = time.perf_counter()
path = pretrained_toy_model_path(PretrainConfig(seed=int(sys.argv[1])), progress=False)
m = pretrain_metrics(path)
m["call_seconds"] = time.perf_counter() - start
print("RESULT " + json.dumps(m))
"""


def run(seed: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PEFT_TRL_EXT_CACHE": cache, "HF_HUB_OFFLINE": "1"}
        out = subprocess.run(
            [sys.executable, "-c", WORKER, str(seed)], env=env, capture_output=True, text=True, cwd=ROOT
        )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(p, RESULTS / "toy_pretraining.txt", threads=[1, 2], seed=[0, 1])
    return apply_common_flags(p.parse_args())


def measure(a):
    started = time.perf_counter()
    rows = []
    for seed in a.seed:
        for threads in a.threads:
            m = run(seed, threads)
            rows.append((seed, threads, m))
            print(f"seed {seed}, {threads} thread(s): held-out {m['heldout_accuracy']:.3f}", flush=True)
    cfg = rows[0][2]["config"]
    spec = cfg["model"]
    print(
        f"\ntoy pretraining, default settings: {spec['arch']} {spec['hidden_size']} wide x "
        f"{spec['num_hidden_layers']} layers, {cfg['steps']} steps of batch {cfg['batch_size']}, lr {cfg['learning_rate']}, "
        f"{cfg['num_train']} training problems; held-out: {cfg['num_eval']} problems never seen in training"
    )
    header = (
        f"{'seed':>4} {'threads':>7} {'held-out acc':>12} {'chat form':>9} {'untrained':>9} "
        f"{'train s':>7} {'train cpu s':>11} {'whole call s':>12}"
    )
    print(header + "\n" + "-" * len(header))
    for seed, threads, m in rows:
        print(
            f"{seed:>4} {threads:>7} {m['heldout_accuracy']:>12.3f} {m['heldout_accuracy_chat']:>9.3f} "
            f"{m['heldout_accuracy_before']:>9.3f} {m['train_seconds']:>7.1f} {m['train_cpu_seconds']:>11.1f} "
            f"{m['call_seconds']:>12.1f}"
        )
    worst = min(m["heldout_accuracy"] for _, _, m in rows)
    slowest = max(m["call_seconds"] for _, _, m in rows)
    print(f"\nlowest held-out accuracy {worst:.3f}; slowest whole call {slowest:.1f} s")
    print(f"total time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    cli = main()
    with recording(cli.output):
        measure(cli)
