"""Prefix Grouper on a GPU in one command: exactness, speed and memory against the stock GRPO trainer.

Sections (each writes its lines to the results file, and a failing section does not stop the others):

1. **Exactness matrix**: for fp32 and bf16 and each block kernel of the split attention (``lower_right``: public SDPA
   with a lower-right causal bias, the CUDA path; ``merged``: two fused calls merged through their log-sum-exp, which
   uses CPU-only ATen kernels and is reported as not applicable off the CPU):
   (a) the attention alone on a packed batch with prefix padding and blocks of different lengths, output and
   gradients against the dense reference (the layout's additive mask through SDPA, in fp64 on CPU); (b) a tiny
   Llama through the stock and the grouped trainer: per-token log-probs, whole and in chunks of 3 rows. fp32 must be
   within 1e-5 of the reference (relative to its largest value); bf16 must drift from the fp64/fp32 reference no more
   than 2x the stock bf16 path does.
2. **Speed and peak memory** of one log-prob forward+backward of one group through each trainer's
   ``_get_per_token_logps_and_entropies`` (TRL's fused log-prob head, activation checkpointing on both sides), at a
   1.5B-class config with random weights in bf16 (Qwen2-1.5B shapes: hidden 1536, 28 layers, 12 heads x 128, 2 KV
   heads, MLP 8960, vocabulary 151936) for P=2048, R=2048, G=8 and P=4096, R=512, G=8. Wall time (CUDA synchronised),
   fastest of ``--rounds`` after a warm-up, and ``torch.cuda.max_memory_allocated`` growth.
3. **Sliding windows and attention sinks**: a tiny Mistral with a window shorter than the sequences and a tiny
   GPT-OSS (sinks, sliding layers) through both trainers, fp32. A model the installed split attention cannot run is
   reported as refused (with the message), never compared.

On CUDA only the ``lower_right`` kernel runs; the ``merged`` rows report its failure there.
``--smoke`` runs every section on CPU at tiny shapes (a 2-layer d=64 model for section 2, P=32, R=16, G=4), so the
script is exercised in CI.

Usage:
    python benchmarks/gpu_check.py                  # on a CUDA machine, < 8 minutes on one GPU
    python benchmarks/gpu_check.py --smoke --output /tmp/gpu_check_smoke.txt
"""

from __future__ import annotations

import argparse
import tempfile
import time
import traceback

import torch
from harness import RESULTS, add_common_flags, apply_common_flags, write_results

SEED = 0  # every generator's base seed; --seed sets it

KERNELS = ("lower_right", "merged")
QWEN2_1_5B = dict(
    hidden_size=1536,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    intermediate_size=8960,
    vocab_size=151936,
    max_position_embeddings=32768,
)
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=128,
    max_position_embeddings=256,
)


# ---------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-30))


def forced_kernel(kernel: str):
    """A context in which every layout built from packed rows uses ``kernel``."""
    import contextlib

    from trl_ext.prefix_grouper.attention import GroupedAttentionLayout

    @contextlib.contextmanager
    def context():
        original = GroupedAttentionLayout.from_packed.__func__

        def from_packed(cls, packed):
            layout = original(cls, packed)
            layout.kernel = kernel
            return layout

        GroupedAttentionLayout.from_packed = classmethod(from_packed)
        try:
            yield
        finally:
            GroupedAttentionLayout.from_packed = classmethod(original)

    return context()


def packed_example(device):
    """A packed batch: two groups, prompts of 5 and 9 tokens (prefix padding), blocks of different lengths."""
    from trl_ext.prefix_grouper.layout import find_groups, pack_groups

    gen = torch.Generator().manual_seed(SEED)
    prompt_ids = torch.randint(5, 100, (6, 9), generator=gen)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[:3, :4] = 0
    prompt_ids[3:] = prompt_ids[3]
    prompt_ids[:3] = prompt_ids[0]
    completion_ids = torch.randint(5, 100, (6, 7), generator=gen)
    lengths = torch.tensor([7, 3, 5, 1, 6, 2])
    completion_mask = (torch.arange(7)[None] < lengths[:, None]).long()
    groups = find_groups(prompt_ids, prompt_mask)
    packed = pack_groups(prompt_ids, prompt_mask, completion_ids, completion_mask, groups)
    return packed


# ---------------------------------------------------------------------------- 1. exactness
def attention_exactness(device, dtype, kernel) -> str:
    """Split attention vs the dense masked reference: output and q/k/v gradients."""
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import repeat_kv

    from trl_ext.prefix_grouper.attention import GroupedAttentionLayout, split_attention
    from trl_ext.prefix_grouper.layout import attention_allowed

    packed = packed_example("cpu")
    layout = GroupedAttentionLayout.from_packed(packed)
    layout.kernel = kernel
    if layout.prefix_key_padding is not None:
        layout.prefix_key_padding = layout.prefix_key_padding.to(device)
    rows, length, heads, kv_heads, dim = packed.num_rows, packed.seq_len, 8, 2, 64
    gen = torch.Generator().manual_seed(SEED + 1)
    qkv = [torch.randn(rows, h, length, dim, generator=gen, dtype=torch.float64) for h in (heads, kv_heads, kv_heads)]
    grad_out = torch.randn(rows, length, heads, dim, generator=gen, dtype=torch.float64)
    real = packed.segment_ids != -1  # padding rows are never used

    def dense(q, k, v):
        allowed = attention_allowed(packed.segment_ids.to(q.device))[:, None]
        mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
        out = F.scaled_dot_product_attention(
            q, repeat_kv(k, heads // kv_heads), repeat_kv(v, heads // kv_heads), attn_mask=mask
        )
        return out.transpose(1, 2)

    def run(fn, run_dtype, run_device):
        inputs = [x.detach().to(run_device, run_dtype).clone().requires_grad_() for x in qkv]
        out = fn(*inputs)
        (out.float() * grad_out.to(run_device, torch.float32)).masked_fill(
            ~real.to(run_device)[..., None, None], 0
        ).sum().backward()
        return [out.detach().masked_fill(~real.to(run_device)[..., None, None], 0)] + [x.grad for x in inputs]

    reference = run(dense, torch.float64, "cpu")
    grouped = run(lambda q, k, v: split_attention(q, k, v, layout), dtype, device)
    names = ("out", "dq", "dk", "dv")
    errors = {n: rel_err(g, r) for n, g, r in zip(names, grouped, reference)}
    worst = max(errors.values())
    if dtype == torch.float32:
        verdict = "exact" if worst <= 1e-5 else "WRONG"
        return f"{verdict}: max rel err {worst:.1e} (" + ", ".join(f"{n} {e:.1e}" for n, e in errors.items()) + ")"
    stock = run(dense, dtype, device)
    stock_worst = max(rel_err(s, r) for s, r in zip(stock, reference))
    verdict = "ok" if worst <= 2 * stock_worst + 1e-6 else "WORSE THAN STOCK"
    return f"{verdict}: grouped bf16 rel err {worst:.1e} vs stock (dense sdpa) bf16 {stock_worst:.1e}"


def trainer_pair(model_factory, device, tmp: str, **overrides):
    """A stock and a grouped trainer on identical copies of ``model_factory()`` (or the grouped trainer's refusal)."""
    import copy

    from trl import GRPOConfig, GRPOTrainer

    from peft_trl_testbed import arithmetic_reward, build_toy_tokenizer, make_arithmetic_dataset, toy_args
    from trl_ext import PrefixGrouperGRPOConfig, PrefixGrouperGRPOTrainer

    model = model_factory().to(device)
    trainers = []
    for grouped in (False, True):
        config_cls, trainer_cls = (
            (PrefixGrouperGRPOConfig, PrefixGrouperGRPOTrainer) if grouped else (GRPOConfig, GRPOTrainer)
        )
        settings = dict(
            per_device_train_batch_size=8,
            num_generations=4,
            max_completion_length=7,
            beta=0.0,
            disable_dropout=True,
            bf16=False,
            use_cpu=device.type == "cpu",
        )
        settings.update(overrides)
        args = toy_args(config_cls, f"{tmp}/{grouped}", **settings)
        trainers.append(
            trainer_cls(
                model=copy.deepcopy(model) if not grouped else model,
                reward_funcs=arithmetic_reward,
                args=args,
                train_dataset=make_arithmetic_dataset(8),
                processing_class=build_toy_tokenizer(),
            )
        )
    return trainers


def test_batch(device, vocab: int):
    """Three prompts of 3, 7 and 11 tokens, left-padded, 8 completions of 1 to 7 tokens, groups interleaved."""
    gen = torch.Generator().manual_seed(SEED)
    prompts = [torch.randint(10, min(vocab, 100), (n,), generator=gen).tolist() for n in (3, 7, 11)]
    ids, mask = [], []
    for row, letter in enumerate("aabacbcb"):
        prompt = prompts["abc".index(letter)]
        length = 1 + (row * 3) % 7
        completion = torch.randint(10, min(vocab, 100), (length,), generator=gen).tolist()
        ids.append([0] * (11 - len(prompt)) + prompt + completion + [0] * (7 - length))
        mask.append([0] * (11 - len(prompt)) + [1] * (len(prompt) + length) + [0] * (7 - length))
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device), 7


def trainer_logps(trainer, batch, batch_size=None):
    input_ids, mask, keep = batch
    with torch.no_grad():
        return trainer._get_per_token_logps_and_entropies(
            trainer.model.eval(), input_ids, mask, keep, batch_size=batch_size
        )[0]


def tiny_llama(dtype=torch.float32):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY, attn_implementation="sdpa"), dtype=torch.float32)
    with torch.no_grad():  # unit-scale weights: log-probs far from uniform
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                scale = 1.0 if "embed" in name else 1.5 / min(param.shape) ** 0.5
                param.copy_(
                    torch.randn(param.shape, generator=torch.Generator().manual_seed(SEED + len(name))) * scale
                )
    return model.to(dtype)


def trainer_exactness(device, dtype, tmp):
    """Stock vs grouped trainer log-probs on a tiny Llama (whole and in chunks of 3 rows), per kernel.

    Returns a function of the kernel name; the trainers are built once per dtype.
    """
    batch = test_batch(device, TINY["vocab_size"])
    mask = batch[1][:, -batch[2] :].bool()
    if dtype == torch.float32:
        stock, grouped = trainer_pair(tiny_llama, device, tmp + "/fp32")
        expected = {bs: trainer_logps(stock, batch, bs)[mask] for bs in (None, 3)}

        def check(kernel):
            with forced_kernel(kernel):
                worst = max(rel_err(trainer_logps(grouped, batch, bs)[mask], expected[bs]) for bs in (None, 3))
            return f"{'exact' if worst <= 1e-5 else 'WRONG'}: log-prob max rel err {worst:.1e} (whole, chunks of 3)"

        return check
    reference = trainer_pair(tiny_llama, device, tmp + "/ref")[0]
    stock, grouped = trainer_pair(lambda: tiny_llama(dtype), device, tmp + "/low")
    expected = trainer_logps(reference, batch)[mask]
    stock_drift = max(rel_err(trainer_logps(stock, batch, bs)[mask], expected) for bs in (None, 3))

    def check(kernel):
        with forced_kernel(kernel):
            drift = max(rel_err(trainer_logps(grouped, batch, bs)[mask], expected) for bs in (None, 3))
        verdict = "ok" if drift <= 2 * stock_drift + 1e-6 else "WORSE THAN STOCK"
        return f"{verdict}: bf16 log-prob drift from fp32, grouped {drift:.1e} vs stock {stock_drift:.1e}"

    return check


def exactness_section(device, tmp) -> list[str]:
    lines = [
        "## 1. Exactness matrix",
        "",
        "| dtype | kernel | attention vs dense reference | trainer log-probs vs stock |",
        "|---|---|---|---|",
    ]
    for dtype in (torch.float32, torch.bfloat16):
        try:
            trainer_check = trainer_exactness(device, dtype, tmp)
        except Exception as error:  # noqa: BLE001 -- reported in every row of this dtype
            message = f"fails on {device.type}: {type(error).__name__}: {str(error)[:120]}"
            trainer_check = lambda kernel, message=message: message  # noqa: E731
        for kernel in KERNELS:
            cells = []
            for check in (lambda k, dtype=dtype: attention_exactness(device, dtype, k), trainer_check):
                try:
                    cells.append(check(kernel))
                except Exception as error:  # noqa: BLE001 -- reported (a kernel may not exist on this device)
                    cells.append(f"fails on {device.type}: {type(error).__name__}: {str(error)[:120]}")
            lines.append(f"| {str(dtype).removeprefix('torch.')} | {kernel} | {cells[0]} | {cells[1]} |")
            print(lines[-1], flush=True)
    return lines


# ---------------------------------------------------------------------------- 2. speed and memory
def speed_section(device, smoke: bool, rounds: int, tmp) -> list[str]:
    from transformers import AutoModelForCausalLM, Qwen2Config

    shapes = [(32, 16, 4)] if smoke else [(2048, 2048, 8), (4096, 512, 8)]
    sizes = TINY if smoke else QWEN2_1_5B
    dtype = torch.float32 if smoke else torch.bfloat16
    name = "tiny Qwen2 d=64, 2 layers (smoke)" if smoke else "Qwen2-1.5B shapes, random weights"
    lines = [
        "## 2. Log-prob forward+backward of one group: stock vs grouped",
        "",
        f"{name}, {str(dtype).removeprefix('torch.')}, activation checkpointing, fused log-prob head; fastest of "
        f"{rounds} after a warm-up; memory is the growth of peak allocated device memory"
        + (" (not measured on CPU)" if device.type != "cuda" else ""),
        "",
        "| P | R | G | stock s | grouped s | speedup | stock peak GiB | grouped peak GiB | memory grouped / stock |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def factory():
        with torch.device(device):
            torch.manual_seed(SEED)
            return AutoModelForCausalLM.from_config(Qwen2Config(**sizes, attn_implementation="sdpa"), dtype=dtype)

    for prompt_len, completion_len, group in shapes:
        try:
            results = {}
            stock, grouped = trainer_pair(factory, device, tmp, max_completion_length=completion_len)
            gen = torch.Generator().manual_seed(SEED)
            prompt = torch.randint(10, 100, (1, prompt_len), generator=gen).expand(group, -1)
            completions = torch.randint(10, 100, (group, completion_len), generator=gen)
            input_ids = torch.cat([prompt, completions], 1).to(device)
            mask = torch.ones_like(input_ids)
            for label, trainer in (("stock", stock), ("grouped", grouped)):
                model = trainer.model.train()
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                best, peak = float("inf"), 0
                for step in range(rounds + 1):
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        base = torch.cuda.memory_allocated(device)
                        torch.cuda.reset_peak_memory_stats(device)
                    sync(device)
                    start = time.perf_counter()
                    logps = trainer._get_per_token_logps_and_entropies(model, input_ids, mask, completion_len)[0]
                    logps.sum().backward()
                    sync(device)
                    if step:
                        best = min(best, time.perf_counter() - start)
                    if device.type == "cuda":
                        peak = max(peak, torch.cuda.max_memory_allocated(device) - base)
                    model.zero_grad(set_to_none=True)
                    del logps
                results[label] = (best, peak / 2**30)
            (s_t, s_m), (g_t, g_m) = results["stock"], results["grouped"]
            memory = ["n/a"] * 3
            if device.type == "cuda":
                memory = [f"{s_m:.2f}", f"{g_m:.2f}", f"{g_m / s_m:.2f}"]
            lines.append(
                f"| {prompt_len} | {completion_len} | {group} | {s_t:.3f} | {g_t:.3f} | {s_t / g_t:.2f}x | "
                + " | ".join(memory)
                + " |"
            )
        except Exception as error:  # noqa: BLE001 -- e.g. out of memory: reported, the run goes on
            lines.append(
                f"| {prompt_len} | {completion_len} | {group} | failed: {type(error).__name__}: "
                f"{str(error)[:150]} | | | | | |"
            )
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(lines[-1], flush=True)
    return lines


# ---------------------------------------------------------------------------- 3. sliding windows and sinks
def window_models():
    from transformers import AutoConfig, AutoModelForCausalLM

    def build(model_type, **extra):
        def factory():
            config = AutoConfig.for_model(model_type, **{**TINY, "head_dim": 16, **extra})
            torch.manual_seed(SEED)
            model = AutoModelForCausalLM.from_config(
                config, attn_implementation="eager" if model_type == "gpt_oss" else "sdpa", dtype=torch.float32
            )
            with torch.no_grad():
                for name, param in model.named_parameters():
                    gen = torch.Generator().manual_seed(SEED + len(name))
                    if param.dim() >= 2:
                        scale = 1.0 if "embed" in name else 1.5 / min(param.shape[-2:]) ** 0.5
                        param.copy_(torch.randn(param.shape, generator=gen) * scale)
                    elif "sinks" in name:
                        param.copy_(torch.randn(param.shape, generator=gen))
            return model

        return factory

    return {
        "mistral, sliding_window=6": build("mistral", sliding_window=6),
        "gpt_oss, sinks + sliding_window=6": build(
            "gpt_oss", sliding_window=6, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.0
        ),
    }


def window_section(device, tmp) -> list[str]:
    lines = [
        "## 3. Sliding windows and attention sinks (fp32, stock vs grouped trainer log-probs)",
        "",
        "| model | verdict |",
        "|---|---|",
    ]
    for name, factory in window_models().items():
        try:
            stock, grouped = trainer_pair(factory, device, tmp)
            batch = test_batch(device, TINY["vocab_size"])
            mask = batch[1][:, -batch[2] :].bool()
            worst = max(
                rel_err(trainer_logps(grouped, batch, bs)[mask], trainer_logps(stock, batch, bs)[mask])
                for bs in (None, 3)
            )
            verdict = f"{'exact' if worst <= 1e-5 else 'WRONG'}: log-prob max rel err {worst:.1e}"
        except ValueError as error:
            verdict = f"refused at construction: {str(error)[:200]}"
        except Exception as error:  # noqa: BLE001
            verdict = f"CRASH: {type(error).__name__}: {str(error)[:200]}"
        lines.append(f"| {name} | {verdict} |")
        print(lines[-1], flush=True)
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes (CI)")
    add_common_flags(
        parser, RESULTS / "gpu_check.txt", rounds=3, rounds_help="timed repetitions per point (best kept)"
    )
    cli = apply_common_flags(parser.parse_args())
    global SEED
    SEED = cli.seed
    device = torch.device("cpu" if cli.smoke or not torch.cuda.is_available() else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 exactness is checked at 1e-5: no TF32 matmuls
    if not cli.smoke and device.type != "cuda":
        raise SystemExit("No CUDA device: run with --smoke for the CPU check, or on a machine with a GPU.")
    output = cli.output
    if cli.smoke and output == parser.get_default("output"):
        output = RESULTS / "gpu_check_smoke.txt"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    lines = [f"device: {name}", ""]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for section in (
            lambda: exactness_section(device, tmp),
            lambda: speed_section(device, cli.smoke, cli.rounds, tmp),
            lambda: window_section(device, tmp),
        ):
            try:
                lines += section() + [""]
            except Exception:  # noqa: BLE001 -- a broken section is reported, the others still run
                lines += ["section failed:", traceback.format_exc(), ""]
    lines.append(f"total wall time {time.perf_counter() - start:.0f} s")
    print("\n".join(lines))
    print(f"saved to {write_results(output, chr(10).join(lines))}")


if __name__ == "__main__":
    main()
