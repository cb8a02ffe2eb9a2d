"""Command line for subnetwork masks.

    python -m peft_ext.subnet diff BASE TUNED --tol 1e-5 [--relative] --out masks.safetensors [--rank] [--plot p.png]
    python -m peft_ext.subnet analyze masks.safetensors [--plot p.png]
    python -m peft_ext.subnet analyze BASE TUNED --tol 1e-5 [--relative] [--rank] [--plot p.png]
    python -m peft_ext.subnet overlap masks1.safetensors masks2.safetensors [--per-tensor]
    python -m peft_ext.subnet select {random,magnitude} MODEL --density 0.05 --out masks.safetensors [--include q_proj]

BASE and TUNED are folders saved with ``save_pretrained`` (single or sharded safetensors).
"""

from __future__ import annotations

import argparse
import sys

from . import analysis
from .masks import CheckpointReader, MaskFile, save_masks
from .selectors import diff_checkpoints, magnitude_masks, random_masks


def _add_diff_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tol", type=float, default=None, help="tolerance (default 1e-5 absolute, 1e-3 relative)")
    p.add_argument("--relative", action="store_true", help="changed iff |w'-w| > tol*max(|w|,|w'|)")
    p.add_argument("--rank", action="store_true", help="also compute the rank of each 2-D update")
    p.add_argument("--include", nargs="*", default=None, help="only parameters containing one of these substrings")
    p.add_argument("--plot", default=None, help="write a PNG plot of the update sparsity here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _diff(args, out=None):
    tol = args.tol if args.tol is not None else (1e-3 if args.relative else 1e-5)
    return diff_checkpoints(
        args.base,
        args.tuned,
        tol=tol,
        relative=args.relative,
        out=out,
        keep_masks=False,
        compute_rank=args.rank,
        include=args.include,
        progress=not args.quiet,
    )


def _report_diff(diff, args) -> None:
    kind = "relative" if diff.relative else "absolute"
    print(f"tolerance {diff.tol:g} ({kind}): {diff.changed:,} of {diff.numel:,} parameters updated ", end="")
    print(f"({100 * diff.fraction_changed:.2f}%), update sparsity {100 * (1 - diff.fraction_changed):.2f}%")
    print(analysis.sparsity_report(diff.tensors))
    if args.plot:
        print(f"plot: {analysis.plot_sparsity(diff.tensors, args.plot)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peft_ext.subnet", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("diff", help="masks of the entries that differ between two checkpoints")
    p.add_argument("base")
    p.add_argument("tuned")
    p.add_argument("--out", required=True, help="masks .safetensors file to write")
    _add_diff_options(p)

    p = sub.add_parser("analyze", help="update sparsity of a masks file, or of the diff of two checkpoints")
    p.add_argument("paths", nargs="+", metavar="MASKS | BASE TUNED")
    _add_diff_options(p)

    p = sub.add_parser("overlap", help="one-sided overlap and Jaccard between two masks files")
    p.add_argument("masks1")
    p.add_argument("masks2")
    p.add_argument("--per-tensor", action="store_true", help="print every tensor, not only the total")

    p = sub.add_parser("select", help="random or magnitude baseline masks for a checkpoint")
    p.add_argument("method", choices=["random", "magnitude"])
    p.add_argument("model")
    p.add_argument("--density", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--include", nargs="*", default=None)
    p.add_argument("--out", required=True)

    args = parser.parse_args(argv)
    try:
        if args.command == "diff":
            diff = _diff(args, out=args.out)
            _report_diff(diff, args)
            print(f"masks: {args.out} ({sum(diff.stored_bytes.values()):,} bytes)")
        elif args.command == "analyze":
            if len(args.paths) == 1:
                masks = MaskFile(args.paths[0])
                tensors = analysis.stats_from_masks(masks)
                print(analysis.sparsity_report(tensors, title="mask density"))
                if args.plot:
                    print(f"plot: {analysis.plot_sparsity(tensors, args.plot, title='mask density')}")
            elif len(args.paths) == 2:
                args.base, args.tuned = args.paths
                _report_diff(_diff(args), args)
            else:
                parser.error("analyze takes one masks file or two checkpoints (BASE TUNED).")
        elif args.command == "overlap":
            rows = analysis.overlap_rows(MaskFile(args.masks1), MaskFile(args.masks2))
            print(analysis.format_table(analysis.OVERLAP_HEADERS, rows if args.per_tensor else rows[-1:]))
        elif args.command == "select":
            reader = CheckpointReader(args.model)
            state = {n: reader.tensor(n) for n in reader.names() if len(reader.shape(n)) == 2}
            if args.method == "random":
                masks = random_masks(state, args.density, seed=args.seed, include=args.include)
            else:
                masks = magnitude_masks(state, args.density, include=args.include)
            nbytes = save_masks(masks, args.out, info={"selector": args.method, "density": args.density})
            print(f"{len(masks)} masks at density {args.density} -> {args.out} ({sum(nbytes.values()):,} bytes)")
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
