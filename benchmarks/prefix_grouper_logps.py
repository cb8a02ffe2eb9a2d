"""Forward+backward time and peak memory of GRPO's log-prob computation: Prefix Grouper vs the stock trainer.

Both sides run the trainers' own ``_get_per_token_logps_and_entropies`` (TRL's fused LM head, entropies on) on one
group: a ``P``-token prompt and ``G`` completions of ``R`` tokens, then backpropagate the summed log-probs. The model
is a random toy Llama (fp32, sdpa) of width 256 and 4 layers by default.

The ideal ratio comes from the cost model of the method (per group, attention counted causally):
stock ``G*(P+R)`` token rows and ``G*(P+R)^2/2`` attention pairs, grouped ``P + G*R`` rows and
``P^2/2 + G*R*(P + R/2)`` pairs, turned into FLOPs with the model's per-token linear cost (projections, MLP,
LM head) and ``4*d`` per attention pair.

Peak memory is measured with the PyTorch profiler (``profile_memory=True``): the running sum of the CPU tensor
allocations and frees recorded during one forward+backward, maximised over time. It counts every tensor
allocated inside the measured region (activations, saved tensors, gradients, temporaries) and nothing allocated
before it (weights, inputs). Times are the fastest of ``--repeats`` runs after one warm-up (the least disturbed by other load), measured
without the
profiler.

Usage:
    python benchmarks/prefix_grouper_logps.py --quick     # P=1024, R=64, G=8 only
    python benchmarks/prefix_grouper_logps.py             # P in {512,1024,2048} x R in {64,256} x G in {4,8,16}
"""

from __future__ import annotations

import argparse
import functools
import itertools
import tempfile
import time
from pathlib import Path

import torch
from timing import logprob_step, make_trainer, one_group, spec_ideal_speedup
from torch.profiler import ProfilerActivity, profile

from trl_ext.toy import ToyModelSpec

RESULTS = Path(__file__).parent / "results"


def peak_bytes(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only P=1024, R=64, G=8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None, help="results file (default benchmarks/results/...)")
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)

    sweep = [(1024, 64, 8)] if cli.quick else list(itertools.product([512, 1024, 2048], [64, 256], [4, 8, 16]))
    spec = ToyModelSpec(
        arch="llama", hidden_size=cli.hidden_size, num_hidden_layers=cli.layers, num_attention_heads=4,
        max_position_embeddings=4096,
    )  # fmt: skip
    out_dir = tempfile.mkdtemp()
    trainers = {name: make_trainer(name == "grouped", spec, out_dir) for name in ("stock", "grouped")}
    tokenizer = trainers["stock"].processing_class
    vocab = trainers["stock"].model.config.vocab_size

    header = (
        f"{'P':>5} {'R':>4} {'G':>3} | {'stock cpu s':>11} {'grouped cpu s':>13} {'speedup':>7} {'ideal':>6} "
        f"{'meas/ideal':>10} {'wall speedup':>12} | {'stock MiB':>9} {'grouped MiB':>11} {'mem ratio':>9}"
    )
    lines = [
        f"Prefix Grouper log-prob fwd+bwd, toy Llama d={spec.hidden_size} L={spec.num_hidden_layers} "
        f"heads={spec.num_attention_heads} vocab={vocab}, fp32 sdpa, {cli.threads} CPU thread(s), one group per batch; "
        "speedup and ideal are stock/grouped",
        header,
        "-" * len(header),
    ]
    print("\n".join(lines), flush=True)
    for prompt_len, completion_len, group in sweep:
        input_ids, mask = one_group(prompt_len, completion_len, group, vocab, tokenizer.eos_token_id)
        cpu, wall, peaks = {}, {}, {}
        for name, trainer in trainers.items():
            run = functools.partial(logprob_step, trainer, input_ids, mask, completion_len)
            run()  # warm-up
            cpu[name] = wall[name] = float("inf")
            for _ in range(cli.repeats):
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                run()
                cpu[name] = min(cpu[name], time.process_time() - start_cpu)
                wall[name] = min(wall[name], time.perf_counter() - start_wall)
            peaks[name] = peak_bytes(run) / 2**20
        speedup = cpu["stock"] / cpu["grouped"]
        ideal = spec_ideal_speedup(spec, vocab, prompt_len, completion_len, group)
        line = (
            f"{prompt_len:>5} {completion_len:>4} {group:>3} | {cpu['stock']:>11.3f} {cpu['grouped']:>13.3f} "
            f"{speedup:>6.2f}x {ideal:>5.2f}x {speedup / ideal:>10.2f} {wall['stock'] / wall['grouped']:>11.2f}x | "
            f"{peaks['stock']:>9.1f} {peaks['grouped']:>11.1f} {peaks['stock'] / peaks['grouped']:>8.2f}x"
        )
        lines.append(line)
        print(line, flush=True)

    RESULTS.mkdir(exist_ok=True)
    output = Path(cli.output) if cli.output else RESULTS / f"prefix_grouper_logps{'_quick' if cli.quick else ''}.txt"
    output.write_text("\n".join(lines) + "\n")
    print(f"saved to {output}")


if __name__ == "__main__":
    main()
