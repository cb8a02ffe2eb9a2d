"""Loss+backward time and peak memory of a preference step: prefix sharing vs the stock trainer.

Each side runs its trainer's own ``compute_loss`` on one pair, a ``P``-token prompt with a chosen and a rejected
completion of ``R`` tokens each (collated as TRL's ``DataCollatorForPreference`` does), then backpropagates the
loss. Two trainers:

- ``dpo+ref``: ``DPOTrainer`` (sigmoid loss) with a reference model, so a step is the policy's forward and backward
  plus the reference forward; ``PrefixSharingDPOTrainer`` shares the prompt in both.
- ``redi``: ``REDITrainer`` (no reference model), ``prefix_sharing=False`` against ``True``.

The model is one random Llama decoder layer (fp32, ``sdpa``), hidden 1024, MLP 4096, 16 heads x 64 with 4 KV heads,
and the toy vocabulary; the reference is a second such layer. Every (point, trainer, side) runs in a fresh worker
process: peak memory is the growth of its peak resident set over its baseline after the models and inputs are built,
times are process CPU seconds (best of ``--rounds`` after a warm-up at a small shape), wall time beside them.

The ideal ratio is :func:`trl_ext.prefix_grouper.cost.ideal_speedup` with a group of two completions: stock / shared
FLOPs counting linear rows and attention pairs (the shared row repeats the last prompt token once per completion).
The auto-on rule of ``prefix_sharing_min_prompt_ratio`` is read off this table: the smallest prompt/completion ratio
from which the shared step is faster at every measured point.

Usage:
    python benchmarks/prefix_sharing_dpo.py --sweep quick   # P=2048, R=256
    python benchmarks/prefix_sharing_dpo.py --sweep grid    # P in {256, 1024, 2048, 4096} x R in {64, 256, 1024}
    python benchmarks/prefix_sharing_dpo.py --sweep all     # the grid and short prompts, P in {16, 64}
"""

from __future__ import annotations

import argparse
import copy
import itertools
import resource
import sys
import tempfile
import time
from pathlib import Path

import harness
from harness import add_common_flags, apply_common_flags

RESULTS = Path(__file__).parent / "results"
HIDDEN, INTERMEDIATE, HEADS, HEAD_DIM, KV_HEADS = 1024, 4096, 16, 64, 4
TRAINERS = ("dpo+ref", "redi")
SWEEPS = {
    "quick": [(2048, 256)],
    # short prompts, below the grid, to find where sharing stops paying
    "short": list(itertools.product([16, 64], [256, 1024])),
    "grid": list(itertools.product([256, 1024, 2048, 4096], [64, 256, 1024])),
}
SWEEPS["all"] = sorted(SWEEPS["short"] + SWEEPS["grid"], key=lambda pr: pr[0] + pr[1])


def build_trainer(trainer: str, shared: bool, max_len: int, seed: int):
    """A stock or prefix-sharing trainer around one random Llama decoder layer (fp32, sdpa), in train mode."""
    from trl import DPOConfig, DPOTrainer

    from peft_trl_testbed import make_reasoning_preferences, toy_args
    from trl_ext import PrefixSharingDPOConfig, PrefixSharingDPOTrainer, REDIConfig, REDITrainer

    shape = dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE)
    model, tokenizer = harness.one_layer_model("llama", HEADS, HEAD_DIM, KV_HEADS, max_len, seed, **shape)
    common = dict(train_dataset=make_reasoning_preferences(2), processing_class=tokenizer)
    sharing = dict(prefix_sharing=shared, prefix_sharing_min_prompt_ratio=0.0)
    out = tempfile.mkdtemp()
    if trainer == "redi":
        return REDITrainer(model=model, args=toy_args(REDIConfig, out, **sharing), **common)
    reference = copy.deepcopy(model)
    if shared:
        return PrefixSharingDPOTrainer(model, reference, toy_args(PrefixSharingDPOConfig, out, **sharing), **common)
    return DPOTrainer(model, reference, toy_args(DPOConfig, out), **common)


def one_pair(prompt_len: int, completion_len: int, vocab: int, eos: int, seed: int = 0) -> dict:
    """One collated pair: rows ``[prompt; chosen]`` and ``[prompt; rejected]``, completions ending in EOS."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(4, vocab, (prompt_len,), generator=gen)
    rows = [torch.cat([prompt, torch.randint(4, vocab, (completion_len - 1,), generator=gen), torch.tensor([eos])])]
    rows.append(
        torch.cat([prompt, torch.randint(4, vocab, (completion_len - 1,), generator=gen), torch.tensor([eos])])
    )
    completion_mask = torch.zeros(2, prompt_len + completion_len, dtype=torch.long)
    completion_mask[:, prompt_len:] = 1
    input_ids = torch.stack(rows)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_mask": completion_mask}


def loss_step(trainer, batch) -> None:
    trainer.model.zero_grad(set_to_none=True)
    trainer.compute_loss(trainer.model, batch).backward()


def worker(job: dict) -> dict:
    """Measure one (trainer, side, P, R) point in this process; return times and peak memory growth."""
    import torch

    torch.set_num_threads(job["threads"])
    prompt_len, completion_len = job["pr"]
    trainer = build_trainer(job["trainer"], job["shared"], prompt_len + completion_len + 8, job["seed"])
    vocab, eos = trainer.model.config.vocab_size, trainer.processing_class.eos_token_id
    loss_step(trainer, one_pair(64, 16, vocab, eos))  # warm-up at a small shape
    batch = one_pair(prompt_len, completion_len, vocab, eos, job["seed"])
    rule = getattr(trainer, "_prefix_sharing_rule", None)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu = wall = float("inf")
    for _ in range(job["rounds"]):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        loss_step(trainer, batch)
        cpu = min(cpu, time.process_time() - start_cpu)
        wall = min(wall, time.perf_counter() - start_wall)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024  # ru_maxrss is in KiB
    packed = rule.calls["shared"] if rule is not None else 0
    return {"cpu_s": cpu, "wall_s": wall, "peak_mb": peak_mb, "vocab": vocab, "packed_forwards": packed}


def header(cli, argv) -> list[str]:
    return [
        harness.results_header([__file__, *argv]),
        f"# model: one Llama decoder layer, hidden {HIDDEN}, MLP {INTERMEDIATE}, {HEADS} heads x {HEAD_DIM}, "
        f"{KV_HEADS} KV heads, fp32, sdpa; toy vocabulary; one pair (chosen and rejected of R tokens) per batch",
        f"# times: process CPU seconds of compute_loss + backward, best of {cli.rounds}; {cli.threads} thread(s) per "
        "worker; dpo+ref = DPOTrainer with a reference model vs PrefixSharingDPOTrainer; redi = REDITrainer "
        "prefix_sharing False vs True",
    ]


def crossing(rows: list[tuple[str, int, int, float]]) -> str:
    """The smallest P/R ratio from which every measured point (of every trainer) is faster shared."""
    ratios = sorted({p / r for _, p, r, _ in rows})
    paying = [x for x in ratios if all(speedup > 1.0 for _, p, r, speedup in rows if p / r >= x)]
    if not paying:
        return "crossing: no prompt/completion ratio at which every measured point is faster shared"
    losing = [f"{t} P={p} R={r} ({s:.2f}x)" for t, p, r, s in rows if s <= 1.0]
    return (
        f"crossing: shared is faster at every point with P/R >= {paying[0]:g} "
        f"(slower or equal: {', '.join(losing) if losing else 'none'})"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", choices=sorted(SWEEPS), default="quick")
    add_common_flags(
        parser, RESULTS / "prefix_sharing_dpo.txt", rounds=1, rounds_help="timed repetitions per point (best kept)"
    )
    argv = sys.argv[1:] if argv is None else argv
    cli = harness.parse_or_work(parser, argv, worker)
    if cli is None:
        return

    from trl_ext.prefix_grouper.cost import ideal_speedup

    apply_common_flags(cli)
    output = Path(cli.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    columns = (
        f"{'trainer':>7} {'P':>5} {'R':>5} {'P/R':>5} | {'stock s':>8} {'shared s':>8} {'speedup':>7} {'ideal':>6} "
        f"{'meas/ideal':>10} {'wall x':>6} | {'stock MB':>8} {'shared MB':>9} {'mem ratio':>9}"
    )
    lines = header(cli, argv) + [columns, "-" * len(columns)]
    print("\n".join(lines), flush=True)
    measured = []
    for (prompt_len, completion_len), trainer in itertools.product(SWEEPS[cli.sweep], TRAINERS):
        job = {"trainer": trainer, "pr": (prompt_len, completion_len), "threads": cli.threads}
        job.update(rounds=cli.rounds, seed=cli.seed)
        res = {side: harness.run_worker(__file__, {**job, "shared": side == "shared"}) for side in ("stock", "shared")}
        if res["shared"]["packed_forwards"] == 0:
            raise RuntimeError(f"the shared side of {job} did not pack a single forward")
        speedup = res["stock"]["cpu_s"] / res["shared"]["cpu_s"]
        ideal = ideal_speedup(
            prompt_len,
            completion_len,
            2,
            hidden_size=HIDDEN,
            num_layers=1,
            intermediate_size=INTERMEDIATE,
            kv_size=KV_HEADS * HEAD_DIM,
            vocab_size=res["stock"]["vocab"],
            attention_size=HEADS * HEAD_DIM,
        )
        measured.append((trainer, prompt_len, completion_len, speedup))
        lines.append(
            f"{trainer:>7} {prompt_len:>5} {completion_len:>5} {prompt_len / completion_len:>5.3g} | "
            f"{res['stock']['cpu_s']:>8.2f} {res['shared']['cpu_s']:>8.2f} {speedup:>6.2f}x {ideal:>5.2f}x "
            f"{speedup / ideal:>10.2f} {res['stock']['wall_s'] / res['shared']['wall_s']:>5.2f}x | "
            f"{res['stock']['peak_mb']:>8.0f} {res['shared']['peak_mb']:>9.0f} "
            f"{harness.ratio_text(res['shared']['peak_mb'], res['stock']['peak_mb']):>9}"
        )
        print(lines[-1], flush=True)
        output.write_text("\n".join(lines) + "\n")  # after every point, so a long sweep keeps what it measured
    lines.append("mem ratio = shared / stock peak memory; speedup, ideal and wall x = stock / shared")
    lines.append(crossing(measured))
    output.write_text("\n".join(lines) + "\n")
    print(lines[-1])
    print(f"saved to {output}")


if __name__ == "__main__":
    main()
