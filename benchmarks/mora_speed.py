"""Training step time and memory of MoRA vs LoRA at equal trainable parameters.

All adapters wrap every linear layer of one toy Llama (width 512 by default) and are timed
side by side in one run: each round times one training step (forward, backward, AdamW
step) of every configuration in turn, so machine load affects all of them alike; the table
reports medians and the MoRA/LoRA ratio at the same ``r``. Memory is reported as the bytes
of tensors autograd saves for backward in one step (the activation memory that differs
between methods) plus the adapter's parameters, gradients and AdamW moments; the frozen
base weights are identical for all rows. MoRA's parameter count is at most LoRA's (``r_hat =
floor(sqrt((d_in + d_out) r))``).

What to expect: ``sharing`` costs r_hat**2 <= r (d_in + d_out) multiply-adds per token, like
LoRA. ``rotation`` (and ``decoupling``) apply M to each of the ceil(d_in / r_hat) chunks, i.e.
d_in * r_hat per token: about sqrt(d / 2r) times LoRA's adapter cost, or a fraction
sqrt(2r / d) of the frozen layer's, so its overhead shrinks with model width and grows with r.

Usage (after ``pip install -e .``, or with ``PYTHONPATH=.``):
    python benchmarks/mora_speed.py                      # width 512, r in (8, 32)
    python benchmarks/mora_speed.py --hidden-size 1024 --ranks 8 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from harness import RESULTS, add_common_flags, apply_common_flags, recording
from peft import LoraConfig, get_peft_model

from peft_ext import MoraConfig  # importing peft_ext registers the MORA type
from peft_trl_testbed.models import build_toy_model


def saved_tensor_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd keeps for backward during one forward pass."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    add_common_flags(
        parser, RESULTS / "mora_speed.txt", rounds=8, rounds_help="timed steps per configuration (after one warm-up)"
    )
    return apply_common_flags(parser.parse_args())


def run(args):
    torch.manual_seed(args.seed)
    base = build_toy_model(
        arch="llama", hidden_size=args.hidden_size, num_hidden_layers=args.layers, num_attention_heads=8
    )
    ids = torch.randint(5, 100, (args.batch, args.seq))
    configs = {}
    for r in args.ranks:
        configs[f"LoRA r={r}"] = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear")
        configs[f"MoRA rotation r={r}"] = MoraConfig(r=r, mora_type="rotation", target_modules="all-linear")
        configs[f"MoRA sharing r={r}"] = MoraConfig(r=r, mora_type="sharing", target_modules="all-linear")

    runs = {}
    for name, config in configs.items():
        model = get_peft_model(copy.deepcopy(base), config).train()
        params = [p for p in model.parameters() if p.requires_grad]
        runs[name] = dict(model=model, optimizer=torch.optim.AdamW(params, lr=1e-4), params=params, times=[])

    def step(run):
        start = time.perf_counter()
        run["model"](ids, labels=ids).loss.backward()
        run["optimizer"].step()
        run["optimizer"].zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for run in runs.values():  # warm-up (allocations, AdamW state)
        step(run)
    for _ in range(args.rounds):
        for run in runs.values():
            run["times"].append(step(run))

    print(
        f"toy llama: hidden {args.hidden_size}, {args.layers} layers, all linear layers adapted; "
        f"batch {args.batch} x {args.seq} tokens; {args.rounds} rounds; torch threads {torch.get_num_threads()}"
    )
    header = (
        f"{'adapter':<20} {'trainable':>10} {'step ms':>9} {'time/LoRA':>10} "
        f"{'saved acts MiB':>15} {'adapter state MiB':>18} {'memory/LoRA':>12}"
    )
    print(header)
    print("-" * len(header))
    reference = {}
    for name, run in runs.items():
        n_params = sum(p.numel() for p in run["params"])
        ms = 1000 * statistics.median(run["times"])
        acts = saved_tensor_bytes(run["model"], ids) / 2**20
        state = 4 * n_params * 4 / 2**20  # fp32 parameter, gradient and two AdamW moments
        r = name.split("r=")[1]
        if name.startswith("LoRA"):
            reference[r] = (ms, acts + state)
        ref_ms, ref_mem = reference[r]
        print(
            f"{name:<20} {n_params:>10,} {ms:>9.1f} {ms / ref_ms:>9.2f}x "
            f"{acts:>15.1f} {state:>18.2f} {(acts + state) / ref_mem:>11.2f}x"
        )


if __name__ == "__main__":
    cli = main()
    with recording(cli.output):
        run(cli)
