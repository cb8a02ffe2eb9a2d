"""Training step time and memory of MoRA vs LoRA at equal trainable parameters.

Two sweeps, both printed into one results file (``--sweep`` picks one):

**model**: all adapters wrap every linear layer of one toy Llama (width 512 by default) and are timed
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

**layer**: forward + backward of ONE adapted d x d linear layer (no bias; the input requires a
gradient, as inside a network) for d in ``--dims``, r in ``--ranks``, tokens in ``--tokens``:
LoRA, MoRA rotation, MoRA rotation "before" (the former implementation, which rotated the
activations chunk by chunk before multiplying by M; kept here only for comparison) and MoRA
sharing (with fewer tokens than r_hat, rotation also rotates the activations, then the smaller of
the two). Each round times one step of every adapter in turn (order rotating), so machine load
hits all alike; medians are reported. The inherent cost of rotation is ``1 + r_hat / d_out``: its
forward does ``r_hat / d_out`` of the frozen layer's multiply-adds on top (the goal is rotation
<= 1.05 x that x LoRA's time). Counted over forward + backward, the frozen layer does 2 d_in d_out
multiply-adds per token (output, input gradient), LoRA adds 3 r (d_in + d_out) and rotation
3 n r_hat**2 (output, input gradient, M's gradient); the ``FLOPs/LoRA`` column gives that ratio.
Times are process CPU time by default (``--clock cpu``; with one thread this is the compute time,
and it leaves out time the process waits for a core on a shared machine).

Usage (after ``pip install -e .``, or with ``PYTHONPATH=.``):
    python benchmarks/mora_speed.py                      # both sweeps (about 10 minutes, 1 thread)
    python benchmarks/mora_speed.py --hidden-size 1024 --ranks 8 --rounds 5 --sweep model
    python benchmarks/mora_speed.py --sweep layer --dims 1024 --tokens 256 --rounds 3   # quick subset
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
from peft_ext.mora import ops
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


class OneLayer(torch.nn.Module):
    """A single d x d projection without bias, the unit of the layer sweep."""

    def __init__(self, d: int):
        super().__init__()
        self.proj = torch.nn.Linear(d, d, bias=False)

    def forward(self, x):
        return self.proj(x)


def rotate_activations(layer) -> None:
    """Give a MoRA rotation layer the former forward: rotate each r_hat-chunk of the input (RoPE,
    rotate-half), then multiply every chunk by M. Same output as the folded blocks; for the before/after table."""

    def delta(name, x):
        M = layer.mora_M[name]
        h = layer._cast_input_dtype(layer.mora_dropout[name](x), M.dtype)
        cos, sin = layer._rope(name, M)
        n, r_hat = cos.shape[0], M.shape[0]
        z = ops.rotate(ops.wrap_to(h, n * r_hat).unflatten(-1, (n, r_hat)), cos, sin)
        return ops.decompress(z @ M.T, layer.out_features, "rotation")

    layer._adapter_delta = delta


def layer_sweep(args) -> None:
    """Forward + backward of one adapted linear layer: LoRA vs MoRA rotation (after and before) and sharing."""
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    header = (
        f"{'d':>5} {'r':>3} {'tokens':>6} {'r_hat':>5} {'LoRA ms':>8} {'before ms':>9} {'rotation ms':>11} "
        f"{'sharing ms':>10} {'before/LoRA':>11} {'rotation/LoRA':>13} {'sharing/LoRA':>12} "
        f"{'1+r_hat/d_out':>13} {'FLOPs/LoRA':>10} {'rotation/goal':>13}"
    )
    print(
        f"\none adapted d x d linear layer, forward + backward (input gradient on); {args.rounds} rounds, "
        f"medians; torch threads {torch.get_num_threads()}; {args.clock} time. goal = 1.05 x (1 + r_hat/d_out) x LoRA; "
        "rotation/goal <= 1 meets it. before = rotating the activations (former implementation)"
    )
    print(header)
    print("-" * len(header))
    for d in args.dims:
        for r in args.ranks:
            torch.manual_seed(0)
            base = OneLayer(d)
            configs = {
                "LoRA": LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]),
                "before": MoraConfig(r=r, mora_type="rotation", target_modules=["proj"], init_weights=False),
                "rotation": MoraConfig(r=r, mora_type="rotation", target_modules=["proj"], init_weights=False),
                "sharing": MoraConfig(r=r, mora_type="sharing", target_modules=["proj"], init_weights=False),
            }
            layers, trainable = {}, {}
            for name, config in configs.items():
                layer = get_peft_model(copy.deepcopy(base), config).base_model.model.proj.train()
                if name == "before":
                    rotate_activations(layer)
                layers[name] = layer
                trainable[name] = sum(p.numel() for p in layer.parameters() if p.requires_grad)
            assert trainable["rotation"] <= trainable["LoRA"], trainable
            with torch.no_grad():  # the same M before and after, so that their outputs can be compared
                layers["before"].mora_M["default"].copy_(layers["rotation"].mora_M["default"])
            r_hat = layers["rotation"].mora_r_hat["default"]
            n = ops.num_chunks(d, r_hat)
            flops = (2 * d * d + 3 * n * r_hat**2) / (2 * d * d + 3 * r * (d + d))
            for tokens in args.tokens:
                x = torch.randn(tokens, d).requires_grad_(True)
                grad = torch.randn(tokens, d)
                with torch.no_grad():  # the before and after forwards agree (fp32 rounding)
                    after, before = layers["rotation"](x), layers["before"](x)
                    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4), (after - before).abs().max()
                times = {name: [] for name in layers}
                order = list(layers)
                for round_ in range(args.rounds + 1):  # round 0 warms up
                    for name in order[round_ % len(order) :] + order[: round_ % len(order)]:
                        layer = layers[name]
                        x.grad = None
                        start = clock()
                        layer(x).backward(grad)
                        elapsed = clock() - start
                        layer.zero_grad(set_to_none=True)
                        if round_:
                            times[name].append(elapsed)
                ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
                inherent = 1 + r_hat / d
                ratio = {name: ms[name] / ms["LoRA"] for name in ms}
                print(
                    f"{d:>5} {r:>3} {tokens:>6} {r_hat:>5} {ms['LoRA']:>8.1f} {ms['before']:>9.1f} "
                    f"{ms['rotation']:>11.1f} {ms['sharing']:>10.1f} {ratio['before']:>10.3f}x "
                    f"{ratio['rotation']:>12.3f}x {ratio['sharing']:>11.3f}x {inherent:>13.4f} {flops:>10.3f} "
                    f"{ratio['rotation'] / (1.05 * inherent):>13.3f}",
                    flush=True,
                )
    print(
        "trainable per layer at r: LoRA 2 r d; MoRA r_hat**2 <= 2 r d (r_hat = floor(sqrt(2 d r)), even for rotation)"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--sweep", choices=["all", "model", "layer"], default="all", help="which sweep(s) to run")
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 4096], help="layer sweep: widths d")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 2048], help="layer sweep: tokens per step")
    parser.add_argument(
        "--clock", choices=["cpu", "wall"], default="cpu", help="layer sweep: process CPU or wall time"
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    add_common_flags(
        parser, RESULTS / "mora_speed.txt", rounds=8, rounds_help="timed steps per configuration (after one warm-up)"
    )
    return apply_common_flags(parser.parse_args())


def run(args):
    if args.sweep == "layer":
        return layer_sweep(args)
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
    if args.sweep == "all":
        layer_sweep(args)


if __name__ == "__main__":
    cli = main()
    with recording(cli.output):
        run(cli)
