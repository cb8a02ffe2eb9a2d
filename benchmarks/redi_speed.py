"""Step time and peak memory of REDI against DPO with its reference model, side by side.

Each trainer runs in its own subprocess on the same model (a random toy Llama saved like a
Hub repo, passed by path so DPO loads its reference model as it normally would), the same
pairs and batch size. Step time is the mean over the timed steps after warm-up; peak
memory is the process's peak resident set size (``ru_maxrss``), and the increase over the
process's resident size just before the trainer was built.

    python benchmarks/redi_speed.py --hidden 512 --layers 8 --rounds 8 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

from harness import RESULTS, add_common_flags, apply_common_flags, recording

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(kind: str, a: argparse.Namespace) -> dict:
    from trl import DPOConfig, DPOTrainer

    from peft_trl_testbed import toy_model_path
    from recipes.timing import mean_step_time
    from trl_ext.redi import REDIConfig, REDITrainer

    path = toy_model_path(arch="llama", hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=8)
    before = rss_mb()
    classes = (REDITrainer, REDIConfig) if kind == "REDI" else (DPOTrainer, DPOConfig)
    step_s, trainer = mean_step_time(*classes, path, steps=a.rounds, warmup=a.warmup, batch=a.batch, seed=a.seed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in trainer.model.parameters())
    return {
        "kind": kind,
        "step_s": step_s,
        "peak_mb": peak,
        "increase_mb": peak - before,
        "params": params,
        "has_ref": trainer.ref_model is not None,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--worker", choices=["REDI", "DPO"], help=argparse.SUPPRESS)
    add_common_flags(p, RESULTS / "redi_speed.txt", rounds=10, rounds_help="timed steps per trainer (after warm-up)")
    a = apply_common_flags(p.parse_args())
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker, a)))
        return
    with recording(a.output):
        measure(a)


def measure(a: argparse.Namespace) -> None:
    """Run each trainer in its own worker process and print the side-by-side table."""
    rows = {}
    for kind in ("DPO", "REDI"):
        out = subprocess.run(
            [sys.executable, __file__, "--worker", kind, *sys.argv[1:]], capture_output=True, text=True, check=True
        ).stdout
        rows[kind] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    d, r = rows["DPO"], rows["REDI"]
    print(
        f"toy Llama {a.hidden} wide x {a.layers} layers ({d['params'] / 1e6:.1f}M params), batch {a.batch} pairs, "
        f"{a.rounds} timed steps after {a.warmup} warm-up, CPU fp32"
    )
    print(f"{'trainer':<8}{'ref model':>10}{'step (s)':>10}{'peak RSS (MB)':>15}{'RSS increase (MB)':>19}")
    for row in (d, r):
        print(
            f"{row['kind']:<8}{str(row['has_ref']):>10}{row['step_s']:>10.3f}{row['peak_mb']:>15.0f}"
            f"{row['increase_mb']:>19.0f}"
        )
    print(
        f"REDI / DPO: step time {r['step_s'] / d['step_s']:.2f}x, peak RSS {r['peak_mb'] / d['peak_mb']:.2f}x, "
        f"RSS increase {r['increase_mb'] / d['increase_mb']:.2f}x"
    )


if __name__ == "__main__":
    main()
