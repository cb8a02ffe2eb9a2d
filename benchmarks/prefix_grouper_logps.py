"""Forward+backward time and peak memory of GRPO's log-prob computation: Prefix Grouper vs the stock trainer.

Both sides run the trainers' own ``_get_per_token_logps_and_entropies`` (TRL's fused LM head, entropies on) on one
group, a ``P``-token prompt and ``G`` completions of ``R`` tokens, then backpropagate the summed log-probs. The model
is one random Llama decoder layer (fp32, ``sdpa``) of hidden size 1024 and MLP 4096 with the attention shape under
test (heads, head_dim and KV heads set independently through ``head_dim``), and the toy vocabulary.

Every (shape, method) runs in a fresh worker process, so peak memory is the growth of the worker's peak resident
set over its baseline after the model and inputs are built (weights and inputs excluded; activations, saved tensors,
gradients and temporaries included). Times are process CPU time (robust to other load on the machine), the fastest
of ``--rounds`` runs after a warm-up at a small shape; wall time is reported beside them.

The ideal ratio is :func:`trl_ext.prefix_grouper.cost.ideal_speedup` (stock / grouped FLOPs, counting the G repeated
last prompt tokens of the layout). Points whose estimated stock activation memory exceeds ``--max-gb`` are skipped.

Usage:
    python benchmarks/prefix_grouper_logps.py --sweep quick     # the two headline points
    python benchmarks/prefix_grouper_logps.py --sweep lengths   # P x R x G at 16 heads x 64, 4 KV heads
    python benchmarks/prefix_grouper_logps.py --sweep shapes    # heads x head_dim x KV heads at P=2048, R=1024, G=8
    python benchmarks/prefix_grouper_logps.py --sweep all
"""

from __future__ import annotations

import argparse
import itertools
import resource
import sys
import tempfile
import time
from pathlib import Path

import harness
from harness import add_common_flags, apply_common_flags

RESULTS = Path(__file__).parent / "results"


def _tokens(plg: tuple[int, int, int]) -> int:
    prompt_len, completion_len, group = plg
    return group * (prompt_len + completion_len)


HIDDEN, INTERMEDIATE = 1024, 4096
BASE_SHAPE = (16, 64, 4)  # heads, head_dim, KV heads
SHAPES = [(16, 64, 4), (16, 64, 16), (16, 128, 4), (32, 64, 8), (32, 128, 8)]
SWEEPS = {
    "quick": [(BASE_SHAPE, (2048, 2048, 8)), (BASE_SHAPE, (4096, 512, 8))],
    "lengths": [(BASE_SHAPE, plg) for plg in itertools.product([512, 2048, 4096], [256, 1024, 2048], [4, 8, 16])],
    "shapes": [(shape, (2048, 1024, 8)) for shape in SHAPES],
}
# Cheapest first within each part, so that a sweep cut short has measured as many points as possible
SWEEPS["all"] = SWEEPS["quick"] + [
    point
    for point in SWEEPS["shapes"] + sorted(SWEEPS["lengths"], key=lambda point: _tokens(point[1]))
    if point not in SWEEPS["quick"]
]
SWEEPS["all"] = list(dict.fromkeys(SWEEPS["all"]))


def estimated_stock_gb(heads: int, head_dim: int, kv_heads: int, prompt_len: int, completion_len: int, group: int):
    """Rough fp32 activation memory of the stock forward+backward (10 hidden, 4 MLP and 4 attention widths a row)."""
    per_token = 4 * (10 * HIDDEN + 4 * INTERMEDIATE + 4 * heads * head_dim + 2 * kv_heads * head_dim)
    return group * (prompt_len + completion_len) * per_token / 2**30


def build_trainer(grouped: bool, heads: int, head_dim: int, kv_heads: int, max_len: int, output_dir: str, seed=0):
    """A stock or grouped GRPO trainer around one random Llama decoder layer (fp32, sdpa), in train mode."""
    from recipes.timing import make_trainer

    shape = dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE)
    model, _ = harness.one_layer_model("llama", heads, head_dim, kv_heads, max_len, seed, **shape)
    return make_trainer(grouped, model, output_dir)


def worker(job: dict) -> dict:
    """Measure one (method, shape, P, R, G) point in this process; return times and peak memory growth."""
    import torch

    from recipes.timing import logprob_step, one_group

    torch.set_num_threads(job["threads"])
    heads, head_dim, kv_heads = job["shape"]
    prompt_len, completion_len, group = job["plg"]
    trainer = build_trainer(
        job["grouped"], heads, head_dim, kv_heads, prompt_len + completion_len + 8, tempfile.mkdtemp(), job["seed"]
    )
    vocab, eos = trainer.model.config.vocab_size, trainer.processing_class.eos_token_id
    logprob_step(trainer, *one_group(64, 16, 2, vocab, eos), 16)  # warm-up at a small shape
    input_ids, mask = one_group(prompt_len, completion_len, group, vocab, eos)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu = wall = float("inf")
    for _ in range(job["rounds"]):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        logprob_step(trainer, input_ids, mask, completion_len)
        cpu = min(cpu, time.process_time() - start_cpu)
        wall = min(wall, time.perf_counter() - start_wall)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024  # ru_maxrss is in KiB
    return {"cpu_s": cpu, "wall_s": wall, "peak_mb": peak_mb, "vocab": vocab}


def run_worker(job: dict) -> dict:
    return harness.run_worker(__file__, job)


def header(cli, argv) -> list[str]:
    """The harness's header, then what every point measures."""
    return [
        harness.results_header([__file__, *argv]),
        f"# model: one Llama decoder layer, hidden {HIDDEN}, MLP {INTERMEDIATE}, fp32, sdpa; toy vocabulary; "
        f"one group per batch; times are process CPU seconds, best of {cli.rounds}; {cli.threads} thread(s) per worker",
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", choices=sorted(SWEEPS), default="quick")
    parser.add_argument("--max-gb", type=float, default=20.0, help="skip points whose stock run needs more memory")
    add_common_flags(
        parser,
        RESULTS / "prefix_grouper_logps_<sweep>.txt",
        rounds=1,
        rounds_help="timed repetitions per point (best kept)",
    )
    parser.add_argument("--resume", action="store_true", help="keep the points already measured in the results file")
    argv = sys.argv[1:] if argv is None else argv
    cli = harness.parse_or_work(parser, argv, worker)
    if cli is None:
        return

    from trl_ext.prefix_grouper.cost import ideal_speedup

    apply_common_flags(cli)
    output = Path(str(cli.output).replace("<sweep>", cli.sweep))
    output.parent.mkdir(parents=True, exist_ok=True)
    columns = (
        f"{'heads':>5} {'dim':>4} {'kv':>3} {'P':>5} {'R':>5} {'G':>3} | {'stock s':>8} {'grouped s':>9} "
        f"{'speedup':>7} {'ideal':>6} {'meas/ideal':>10} {'wall x':>6} | {'stock MB':>8} {'grouped MB':>10} "
        f"{'mem ratio':>9}"
    )
    lines = header(cli, argv) + [columns, "-" * len(columns)]
    done = {}
    if cli.resume and output.exists():
        for line in output.read_text().splitlines():
            fields = line.split()
            if len(fields) > 7 and fields[0].isdigit():
                done[tuple(int(f) for f in fields[:6])] = line
    print("\n".join(lines), flush=True)
    for shape, plg in SWEEPS[cli.sweep]:
        heads, head_dim, kv_heads = shape
        prefix = f"{heads:>5} {head_dim:>4} {kv_heads:>3} {plg[0]:>5} {plg[1]:>5} {plg[2]:>3} | "
        if (*shape, *plg) in done:
            lines.append(done[(*shape, *plg)])
        elif estimated_stock_gb(*shape, *plg) > cli.max_gb:
            lines.append(prefix + f"skipped: stock needs about {estimated_stock_gb(*shape, *plg):.0f} GB")
        else:
            res = {
                name: run_worker(
                    {
                        "grouped": name == "grouped",
                        "shape": shape,
                        "plg": plg,
                        "threads": cli.threads,
                        "rounds": cli.rounds,
                        "seed": cli.seed,
                    }
                )
                for name in ("stock", "grouped")
            }
            speedup = res["stock"]["cpu_s"] / res["grouped"]["cpu_s"]
            ideal = ideal_speedup(
                *plg,
                hidden_size=HIDDEN,
                num_layers=1,
                intermediate_size=INTERMEDIATE,
                kv_size=kv_heads * head_dim,
                vocab_size=res["stock"]["vocab"],
                attention_size=heads * head_dim,
            )
            lines.append(
                prefix + f"{res['stock']['cpu_s']:>8.2f} {res['grouped']['cpu_s']:>9.2f} {speedup:>6.2f}x "
                f"{ideal:>5.2f}x {speedup / ideal:>10.2f} {res['stock']['wall_s'] / res['grouped']['wall_s']:>5.2f}x | "
                f"{res['stock']['peak_mb']:>8.0f} {res['grouped']['peak_mb']:>10.0f} "
                f"{harness.ratio_text(res['grouped']['peak_mb'], res['stock']['peak_mb']):>9}"
            )
        print(lines[-1], flush=True)
        output.write_text("\n".join(lines) + "\n")  # after every point, so a long sweep keeps what it measured
    lines.append("mem ratio = grouped / stock peak memory; speedup, ideal and wall x = stock / grouped")
    output.write_text("\n".join(lines) + "\n")
    print(f"saved to {output}")


if __name__ == "__main__":
    main()
