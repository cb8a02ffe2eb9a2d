"""How much a merge/unmerge round trip changes the base weights: MoRA, SUBNET and PEFT's LoRA.

Merging adds an adapter's update into the base weight; unmerging takes it out again. In float
arithmetic ``(w + d) - d`` is not always ``w``: the sum is rounded to the weight's dtype, so each
round trip can move a base entry by a rounding step, and the steps add up. TRL's vLLM weight sync
merges and unmerges once per step, so hundreds of round trips are normal.

Each adapter wraps every linear layer of one toy Llama, in the weight dtype of the row (bf16, fp16
or fp32). Its trainable tensors are drawn so that its update has a root-mean-square of
``--delta-scales`` times the adapted weight's (0.01, 0.1 and 1 by default: the order of a
fine-tuning update, a large one, and one as large as the weights; for SUBNET, on the selected
entries). The table gives, over all entries of the adapted base
weights, the fraction that differs bit-wise from the original, and the largest and mean absolute
change, after 1 and after ``--rounds`` round trips. ``MoRA exact_unmerge`` keeps a copy of each
adapted weight while merged (its memory cost is printed below the table); SUBNET keeps the
overwritten entries.

Usage (after ``pip install -e .``, or with ``PYTHONPATH=.``):
    python benchmarks/merge_precision.py                      # bf16, fp16 and fp32, 200 round trips
    python benchmarks/merge_precision.py --rounds 20 --dtypes bfloat16 --delta-scales 0.01
"""

from __future__ import annotations

import argparse

import torch
from harness import RESULTS, add_common_flags, apply_common_flags, recording
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

from peft_ext import MoraConfig, SubnetConfig  # importing peft_ext registers MORA and SUBNET
from peft_trl_testbed.models import build_toy_model


def adapters(r: int, density: float) -> dict:
    """The adapter configurations compared, by row name."""
    return {
        "LoRA": LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"),
        "MoRA rotation": MoraConfig(r=r, mora_type="rotation", target_modules="all-linear"),
        "MoRA sharing": MoraConfig(r=r, mora_type="sharing", target_modules="all-linear"),
        "MoRA rotation exact_unmerge": MoraConfig(
            r=r, mora_type="rotation", target_modules="all-linear", exact_unmerge=True
        ),
        "SUBNET": SubnetConfig(target_modules="all-linear", density=density, mask_source="random"),
    }


def adapted_layers(model) -> dict[str, BaseTunerLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


@torch.no_grad()
def set_update_scale(model, scale: float, generator: torch.Generator) -> None:
    """Draw every trainable tensor at random, then rescale so each layer's update has RMS ``scale`` x the weight's."""
    for layer in adapted_layers(model).values():
        weight = layer.get_base_layer().weight.float()
        params = [p for n, p in layer.named_parameters() if p.requires_grad]
        for p in params:
            p.copy_(torch.randn(p.shape, generator=generator).to(p.dtype))
        delta = layer.get_delta_weight("default").float()
        selected = delta[delta != 0] if hasattr(layer, "subnet_values") else delta
        factor = scale * weight.pow(2).mean().sqrt() / selected.pow(2).mean().sqrt()
        # The update is linear in M (MoRA), in B (LoRA, with A fixed) and in the values (SUBNET).
        target = [p for n, p in layer.named_parameters() if p.requires_grad and "lora_A" not in n]
        for p in target:
            p.mul_(factor.to(p.dtype))


def drift(original: dict, model) -> tuple[float, float, float]:
    """(fraction of adapted entries changed, max |change|, mean |change|) against ``original``."""
    changed = numel = 0
    largest, total = 0.0, 0.0
    for name, layer in adapted_layers(model).items():
        now = layer.get_base_layer().weight.detach()
        diff = (now.float() - original[name].float()).abs()
        changed += int((now != original[name]).sum())
        numel += now.numel()
        largest = max(largest, diff.max().item())
        total += diff.sum().item()
    return changed / numel, largest, total / numel


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.05, help="SUBNET's fraction of trained entries")
    parser.add_argument(
        "--delta-scales", type=float, nargs="+", default=[0.01, 0.1, 1.0], help="update RMS relative to the weight's"
    )
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"])
    add_common_flags(parser, RESULTS / "merge_precision.txt", rounds=200, rounds_help="merge/unmerge round trips")
    return apply_common_flags(parser.parse_args())


def run(args) -> None:
    print(
        f"toy Llama {args.hidden_size} wide x {args.layers} layers, all linear layers adapted, r={args.r}, "
        f"SUBNET density {args.density}; {args.rounds} round trips. update: RMS of each layer's update / RMS of "
        "its weight. changed: fraction of adapted base entries that differ bit-wise from the original; max, "
        "mean: absolute change over all adapted base entries"
    )
    head = f"{'dtype':<9} {'update':>6} {'adapter':<28} {'changed@1':>10} {'max@1':>9} {'mean@1':>9}"
    head += f" {f'changed@{args.rounds}':>12} {f'max@{args.rounds}':>9} {f'mean@{args.rounds}':>9}"
    print(head)
    copy_bytes = {}
    for dtype_name in args.dtypes:
        for scale in args.delta_scales:
            for name, config in adapters(args.r, args.density).items():
                torch.manual_seed(args.seed)
                base = build_toy_model(
                    arch="llama", hidden_size=args.hidden_size, num_hidden_layers=args.layers, num_attention_heads=8
                ).to(getattr(torch, dtype_name))
                model = get_peft_model(base, config)
                set_update_scale(model, scale, torch.Generator().manual_seed(args.seed + 1))
                original = {n: m.get_base_layer().weight.detach().clone() for n, m in adapted_layers(model).items()}
                copy_bytes[dtype_name] = sum(w.numel() * w.element_size() for w in original.values())
                row = []
                for k in range(1, args.rounds + 1):
                    model.merge_adapter()
                    model.unmerge_adapter()
                    if k in (1, args.rounds):
                        row.append(drift(original, model))
                (f1, m1, a1), (fn, mn, an) = row
                print(
                    f"{dtype_name:<9} {scale:>6g} {name:<28} {f1:>9.2%} {m1:>9.2e} {a1:>9.2e} "
                    f"{fn:>11.2%} {mn:>9.2e} {an:>9.2e}"
                )
    weights = [m.get_base_layer().weight.float() for m in adapted_layers(model).values()]
    rms = torch.cat([w.flatten() for w in weights]).pow(2).mean().sqrt().item()
    print(f"\nRMS of the adapted base weights: {rms:.3g}")
    for dtype_name, nbytes in copy_bytes.items():
        print(
            f"exact_unmerge memory while merged, {dtype_name}: {nbytes / 2**20:.2f} MiB = one copy of every adapted "
            "weight (the adapted weights' own size)"
        )


if __name__ == "__main__":
    cli = main()
    with recording(cli.output):
        run(cli)
