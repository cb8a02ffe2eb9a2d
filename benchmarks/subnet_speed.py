"""Speed, memory and storage of the SUBNET tuner against full fine-tuning, LoRA and PEFT's SHiRA.

1. Training step time (forward + backward + AdamW) at equal trainable count: SUBNET and SHiRA
   train ``r * (in + out)`` random entries per matrix, LoRA has rank ``r``. Methods are timed
   interleaved in one process (median of the rounds); peak memory is the peak RSS growth of a
   separate process per method over the same steps. Then one large adapted layer alone, where the
   adapter's own cost and the bytes autograd keeps for backward are visible.
2. Adapter bytes on disk vs SHiRA and LoRA at that count, and the closed-form index cost per
   density for a 4096 x 4096 matrix.
3. Peak memory of ``diff_checkpoints`` on a >= 1 GB sharded fp32 checkpoint made in /tmp (deleted
   afterwards).

Run: ``python benchmarks/subnet_speed.py`` (about 2-4 minutes on 2 CPU cores). Output is printed
and saved to ``benchmarks/results/subnet_speed.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from harness import RESULTS, ROOT, add_common_flags, apply_common_flags, write_results  # noqa: E402
from peft import LoraConfig, ShiraConfig, get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from peft_ext.subnet import SubnetConfig, analysis, ops  # noqa: E402
from peft_trl_testbed.models import build_toy_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ["full", "lora", "shira", "subnet"]
LINES: list[str] = []


def log(text: str = "") -> None:
    print(text, flush=True)
    LINES.append(text)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """This process's RSS high-water mark. VmHWM, unlike ru_maxrss, is not inherited from the parent on exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def build(method: str, hidden: int, layers: int, r: int):
    """The model for one method; SUBNET gets exactly SHiRA's r * (in + out) entries per matrix."""
    model = build_toy_model(arch="llama", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8)
    if method == "full":
        return model
    if method == "lora":
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS))
    if method == "shira":
        return get_peft_model(model, ShiraConfig(r=r, target_modules=TARGETS, random_seed=0))
    masks = {}
    for name, module in model.named_modules():
        if name.endswith(tuple(TARGETS)):
            out_f, in_f = module.weight.shape
            k = r * (in_f + out_f)
            idx = ops.random_indices(module.weight.numel(), k / module.weight.numel(), seed=0, name=name)
            masks[name + ".weight"] = ops.indices_to_mask(idx, module.weight.shape)
    return get_peft_model(model, SubnetConfig(target_modules=TARGETS, mask_source=masks))


def make_step(model, batch: dict):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    def step():
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def worker(method: str, args) -> None:
    """Peak RSS growth of `steps` training steps of one method, in its own process."""
    torch.manual_seed(args.seed)
    model = build(method, args.hidden, args.layers, args.r)
    batch = _batch(args)
    before = rss_mb()
    step, _ = make_step(model, batch)
    for _ in range(3):
        step()
    print(json.dumps({"peak_growth_mb": peak_rss_mb() - before}))


def _batch(args) -> dict:
    ids = torch.randint(5, 100, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed))
    return {"input_ids": ids, "labels": ids}


def bench_steps(args) -> None:
    torch.manual_seed(args.seed)
    batch = _batch(args)
    runs = {}
    for method in METHODS:
        model = build(method, args.hidden, args.layers, args.r)
        step, trainable = make_step(model, batch)
        step()  # warm-up
        runs[method] = (step, trainable, [])
    for _ in range(args.rounds):
        for method in METHODS:
            step, _, times = runs[method]
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    memory = {}
    for method in METHODS:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", method, *_size_args(args)],
            capture_output=True,
            text=True,
            check=True,
        )
        memory[method] = json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mb"]
    log(
        f"## 1. Training step, llama hidden={args.hidden} layers={args.layers}, batch {args.batch}x{args.seq}, "
        f"targets {'/'.join(TARGETS)}, r={args.r}, AdamW, {args.rounds} interleaved rounds, "
        f"{torch.get_num_threads()} threads"
    )
    subnet_t = statistics.median(runs["subnet"][2])
    rows = []
    for method in METHODS:
        _, trainable, times = runs[method]
        med = statistics.median(times)
        rows.append([method, trainable, 1000 * med, med / subnet_t, memory[method]])
    log(
        analysis.format_table(["method", "trainable", "step ms (median)", "x subnet time", "peak RSS growth MB"], rows)
    )
    shira = statistics.median(runs["shira"][2])
    log(f"SUBNET is {shira / subnet_t:.2f}x faster than SHiRA per step at the same trainable count")


def _size_args(args) -> list[str]:
    return [
        f"--hidden={args.hidden}",
        f"--layers={args.layers}",
        f"--r={args.r}",
        f"--batch={args.batch}",
        f"--seq={args.seq}",
        f"--threads={args.threads}",
        f"--seed={args.seed}",
    ]


def bench_layer(args) -> None:
    """One adapted d x d layer: forward + backward time and the bytes autograd keeps between them."""
    log("")
    log(f"## 1b. One adapted {args.layer_dim}x{args.layer_dim} nn.Linear, forward + backward, r={args.r}")
    d = args.layer_dim
    rows = []
    for tokens in (16, 256, 2048):
        x = torch.randn(tokens, d, requires_grad=True)  # as hidden states inside a network
        layers = {}
        for method in ("lora", "shira", "subnet"):
            torch.manual_seed(args.seed)
            holder = torch.nn.Sequential(torch.nn.Linear(d, d, bias=False))
            if method == "lora":
                layers[method] = get_peft_model(holder, LoraConfig(r=args.r, target_modules=["0"]))
            elif method == "shira":
                layers[method] = get_peft_model(holder, ShiraConfig(r=args.r, target_modules=["0"], random_seed=0))
            else:
                idx = ops.random_indices(d * d, 2 * args.r / d, seed=0, name="0")
                mask = {"0.weight": ops.indices_to_mask(idx, (d, d))}
                layers[method] = get_peft_model(holder, SubnetConfig(target_modules=["0"], mask_source=mask))
        times = {m: [] for m in layers}
        for _ in range(args.rounds):
            for method, model in layers.items():
                t = time.perf_counter()
                model(x).sum().backward()
                times[method].append(time.perf_counter() - t)
        for method, model in layers.items():
            rows.append([tokens, method, 1000 * statistics.median(times[method]), _saved_mb(model, x)])
    log(analysis.format_table(["tokens", "method", "fwd+bwd ms (median)", "saved for backward MB"], rows))


def _saved_mb(model, x) -> float:
    """Bytes of distinct tensors autograd saves for backward (activations and rebuilt weights)."""
    seen = {}

    def pack(t):
        if t.layout == torch.sparse_coo:  # SHiRA saves its sparse delta: count indices + values
            seen[(id(t), t.dtype)] = t._indices().nbytes + t._values().nbytes
        else:
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = sum(n for (ptr, _), n in seen.items() if ptr not in params and ptr != x.untyped_storage().data_ptr())
    out.sum().backward()
    return total / 2**20


def bench_storage(args) -> None:
    log("")
    log(f"## 2. Adapter bytes at equal trainable count (r={args.r}, same model)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("lora", "shira", "subnet"):
            model = build(method, args.hidden, args.layers, args.r)
            trainable, _ = model.get_nb_trainable_parameters()
            model.save_pretrained(f"{tmp}/{method}")
            size = os.path.getsize(f"{tmp}/{method}/adapter_model.safetensors")
            rows.append([method, trainable, size, size / (4 * trainable)])
    base = {r[0]: r[2] for r in rows}
    rows = [r + [r[2] / base["subnet"]] for r in rows]
    log(analysis.format_table(["method", "trainable", "file bytes", "bytes / fp32 value bytes", "x subnet"], rows))
    log("")
    log("index bytes per stored value for one 4096x4096 matrix (closed form; values cost 4 bytes each)")
    numel = 4096 * 4096
    rows = []
    for density in (0.001, 0.01, 1 / 32, 0.05, 0.2, 0.5, 0.9):
        k = ops.num_selected(numel, density)
        ours = min(ops.index_nbytes(k, numel), ops.bitmap_nbytes(numel))
        shira = 2 * 4 * k
        rows.append([f"{100 * density:.2f}%", k, ops.choose_encoding(k, numel), ours / k, shira / k, shira / ours])
    log(
        analysis.format_table(
            ["density", "k", "subnet encoding", "subnet B/value", "SHiRA B/value", "SHiRA/subnet"], rows
        )
    )


def bench_diff(args) -> None:
    log("")
    root = Path(tempfile.mkdtemp(prefix="subnet_diff_bench_", dir="/tmp"))
    try:
        shape, per_shard, shards = (4096, 8192), 2, 4  # 8 fp32 tensors of 128 MiB: 1 GiB in 4 shards
        g = torch.Generator().manual_seed(args.seed)
        for side in ("base", "tuned"):
            (root / side).mkdir()
        weight_map = {}
        for s in range(shards):
            base, tuned = {}, {}
            for t in range(per_shard):
                name = f"model.layers.{s * per_shard + t}.mlp.up_proj.weight"
                w = torch.randn(shape, generator=g)
                base[name] = w
                tuned[name] = w + (torch.rand(shape, generator=g) < 0.05) * 1e-3
                weight_map[name] = f"model-{s:05d}-of-{shards:05d}.safetensors"
            save_file(base, str(root / "base" / weight_map[name]))
            save_file(tuned, str(root / "tuned" / weight_map[name]))
            del base, tuned, w
        for side in ("base", "tuned"):
            (root / side / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        size = sum(f.stat().st_size for f in (root / "base").glob("*.safetensors"))
        shard = max(f.stat().st_size for f in (root / "base").glob("*.safetensors"))
        code = (
            "import sys, time, json; sys.path.insert(0, sys.argv[3])\n"
            "from peft_ext.subnet import diff_checkpoints\n"
            "import os\n"
            "statm = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20\n"
            "before = statm(); t = time.perf_counter()\n"
            "d = diff_checkpoints(sys.argv[1], sys.argv[2], tol=1e-5, out=sys.argv[1] + '/../masks.safetensors', "
            "progress=False)\n"
            "peak = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024\n"
            "print(json.dumps({'s': time.perf_counter() - t, 'before': before, 'peak': peak, "
            "'frac': d.fraction_changed}))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(root / "base"), str(root / "tuned"), str(ROOT)],
            capture_output=True,
            text=True,
            check=True,
        )
        res = json.loads(out.stdout.strip().splitlines()[-1])
        masks_size = (root / "masks.safetensors").stat().st_size
        log(f"## 3. diff_checkpoints on a {size / 2**30:.2f} GiB fp32 checkpoint in {shards} shards (vs its copy)")
        rows = [
            ["checkpoint size (each side)", f"{size / 2**20:,.0f} MiB"],
            ["largest shard", f"{shard / 2**20:,.0f} MiB"],
            ["process RSS before the diff (python + torch)", f"{res['before']:,.0f} MiB"],
            ["peak RSS during the diff", f"{res['peak']:,.0f} MiB"],
            ["peak growth over the baseline", f"{res['peak'] - res['before']:,.0f} MiB"],
            ["masks file written", f"{masks_size / 2**20:,.1f} MiB"],
            ["fraction updated found", f"{100 * res['frac']:.2f}% (5% were perturbed)"],
            ["time", f"{res['s']:.1f} s ({2 * size / 2**20 / res['s']:,.0f} MiB/s read)"],
        ]
        log(analysis.format_table(["quantity", "value"], rows))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    add_common_flags(
        parser, RESULTS / "subnet_speed.txt", rounds=11, rounds_help="interleaved timed steps (median kept)"
    )
    parser.add_argument("--layer-dim", type=int, default=2048)
    parser.add_argument("--skip-diff", action="store_true")
    args = apply_common_flags(parser.parse_args())
    if args.worker:
        worker(args.worker, args)
        return
    bench_steps(args)
    bench_layer(args)
    bench_storage(args)
    if not args.skip_diff:
        bench_diff(args)
    write_results(args.output, "\n".join(LINES))


if __name__ == "__main__":
    main()
