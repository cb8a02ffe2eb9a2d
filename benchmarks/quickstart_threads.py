"""Does the quickstart tell the same story at every thread count? Its table at each, side by side.

Floating point depends on torch's thread count. Each run is a fresh ``python -m recipes.quickstart``
process with ``OMP_NUM_THREADS`` set and its own empty toy cache, so the toy model is pretrained
at that thread count too. Prints every run's table and findings, then the rows side by side.

    python benchmarks/quickstart_threads.py --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import RESULTS, ROOT, add_common_flags, apply_common_flags, recording


def run(threads: int, output_dir: Path) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PEFT_TRL_EXT_CACHE": cache}
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "recipes.quickstart", "--output_dir", str(output_dir)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-4000:])
    report = json.loads((output_dir / "results.json").read_text())
    report["wall_seconds"] = time.perf_counter() - start
    return report


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", default="outputs/quickstart_threads", help="per-run outputs (plots, json)")
    add_common_flags(p, RESULTS / "quickstart_threads.txt", threads=[1, 2])
    a = apply_common_flags(p.parse_args())
    if a.seed != 0:
        p.error(f"--seed {a.seed}: the quickstart fixes its own seeds, so only --seed 0 describes what runs")
    return a


def measure(a):
    reports = {}
    for threads in a.threads:
        reports[threads] = report = run(threads, Path(a.output_dir) / f"threads{threads}")
        print(f"== quickstart with OMP_NUM_THREADS={threads}: {report['wall_seconds']:.0f} s")
        print("\n".join(report["table"]))
        print("Measured in this run:\n" + "\n".join(f"- {line}" for line in report["findings"]) + "\n")

    # Side by side: method, then the "before / baseline" and "after" cells of each run.
    table = {t: [line for line in r["table"] if not line.startswith("-")][1:] for t, r in reports.items()}
    cells = {t: [_cells(line, reports[t]["table"][0]) for line in rows] for t, rows in table.items()}
    first = a.threads[0]
    print("== side by side (before / baseline -> after)")
    for i, row in enumerate(cells[first]):
        print(row["method"])
        for t in a.threads:
            print(f"  {t} thread(s): {cells[t][i]['before / baseline']} -> {cells[t][i]['after']}")
    print("\n" + "  ".join(f"{t} thread(s): {reports[t]['wall_seconds']:.0f} s" for t in a.threads))


def _cells(line: str, header: str) -> dict:
    """Split a fixed-width table row by the column starts of its header."""
    names = ["method", "what it trained", "metric", "before / baseline", "after", "what it buys"]
    starts = [header.index(n) for n in names] + [None]
    return {n: line[s:e].strip() for n, s, e in zip(names, starts, starts[1:])}


if __name__ == "__main__":
    cli = main()
    with recording(cli.output):
        measure(cli)
