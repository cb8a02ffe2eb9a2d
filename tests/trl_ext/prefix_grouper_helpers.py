"""Shared builders for the Prefix Grouper tests: a stock and a grouped trainer on identical models and one batch."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

from peft_trl_testbed import arithmetic_reward, build_toy_tokenizer, make_arithmetic_dataset, toy_args, toy_model_path
from trl_ext import PrefixGrouperGRPOConfig, PrefixGrouperGRPOTrainer
from trl_ext.prefix_grouper.layout import attention_allowed

SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


def model_path(arch: str) -> str:
    kv = dict(num_key_value_heads=2) if arch != "gpt2" else {}  # GQA on the rotary models
    return toy_model_path(arch=arch, **SIZES, **kv)


def sharpen_(model, seed: int = 0):
    """Re-draw the weights at unit scale (same seed -> same weights) so logits, attention and gradients are far
    from uniform: with the toy models' tiny init every log-prob is ~ -log(vocab) and comparisons would be blind."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                fan_in = param.size(-1) if "wte" in name or "embed" in name else min(param.shape)
                std = 1.0 if ("wte" in name or "embed" in name or "wpe" in name) else 1.5 / fan_in**0.5
                param.copy_(torch.randn(param.shape, generator=gen) * std)
            elif "bias" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model


def make_batch(seed: int = 0, rows: str = "aabacbcb", max_completion: int = 7, truncated_row: int | None = None):
    """A stock GRPO batch: left-padded prompts of different lengths (one group per letter of ``rows``, groups
    interleaved), right-padded completions of different lengths ending in EOS."""
    tokenizer = build_toy_tokenizer()
    gen = torch.Generator().manual_seed(seed)
    prompts = {}
    for i, letter in enumerate(sorted(set(rows))):
        length = 3 + 4 * i
        prompts[letter] = torch.randint(10, 90, (length,), generator=gen).tolist()
    prompt_width = max(len(p) for p in prompts.values())
    prompt_ids, prompt_mask, completion_ids, completion_mask = [], [], [], []
    for r, letter in enumerate(rows):
        p = prompts[letter]
        pad = prompt_width - len(p)
        prompt_ids.append([tokenizer.pad_token_id] * pad + p)
        prompt_mask.append([0] * pad + [1] * len(p))
        length = 1 + (r * 3) % max_completion  # 1..max_completion tokens, the last one is EOS
        c = torch.randint(10, 90, (length - 1,), generator=gen).tolist() + [tokenizer.eos_token_id]
        keep = 0 if r == truncated_row else 1
        completion_ids.append(c + [tokenizer.pad_token_id] * (max_completion - length))
        completion_mask.append([keep] * length + [0] * (max_completion - length))
    batch = {
        "prompt_ids": torch.tensor(prompt_ids),
        "prompt_mask": torch.tensor(prompt_mask),
        "completion_ids": torch.tensor(completion_ids),
        "completion_mask": torch.tensor(completion_mask),
        "advantages": torch.randn(len(rows), generator=gen),
    }
    batch["num_items_in_batch"] = batch["completion_mask"].sum()
    return batch


def make_trainer(
    grouped: bool,
    tmp_path,
    arch: str = "llama",
    attn: str = "sdpa",
    peft_config=None,
    plain_config: bool = False,
    reward_funcs=arithmetic_reward,
    **overrides,
):
    path = model_path(arch)
    model = sharpen_(AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32))
    return trainer_for_model(
        model,
        grouped,
        tmp_path,
        attn,
        peft_config=peft_config,
        plain_config=plain_config,
        reward_funcs=reward_funcs,
        **overrides,
    )


def tiny_model(model_type: str, attn: str = "sdpa", **config):
    """A 2-layer fp32 model of ``model_type`` from its config (vocabulary 128, hidden 32), sharpened."""
    sizes = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    sizes = {k: v for k, v in sizes.items() if hasattr(AutoConfig.for_model(model_type), k)}
    settings = {**sizes, "max_position_embeddings": 64, **config}
    cfg = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(0)
    return sharpen_(AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32))


def trainer_for_model(
    model,
    grouped: bool,
    tmp_path,
    attn: str = "sdpa",
    peft_config=None,
    plain_config: bool = False,
    reward_funcs=arithmetic_reward,
    **overrides,
):
    """A stock or grouped trainer around ``model`` (fp32, batch of 8, 4 generations), in train mode."""
    config_cls = PrefixGrouperGRPOConfig if grouped and not plain_config else GRPOConfig
    settings = dict(
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=7,
        disable_dropout=True,
        model_init_kwargs={"attn_implementation": attn, "dtype": torch.float32},
    )
    settings.update(overrides)
    args = toy_args(config_cls, tmp_path / ("grouped" if grouped else "stock"), **settings)
    trainer_cls = PrefixGrouperGRPOTrainer if grouped else GRPOTrainer
    trainer = trainer_cls(
        model=model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=make_arithmetic_dataset(8),
        peft_config=peft_config,
        processing_class=build_toy_tokenizer(),
    )
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


def logps_of(trainer, model, batch, batch_size=None, compute_entropy=True):
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    return trainer._get_per_token_logps_and_entropies(
        model,
        input_ids,
        attention_mask,
        batch["completion_ids"].size(1),
        batch_size=batch_size,
        compute_entropy=compute_entropy,
    )


def ref_logps_of(trainer, batch, batch_size=None):
    """The reference log-probs the way TRL computes them (a reference model, or the PEFT model without adapter)."""
    with torch.no_grad():
        if trainer.ref_model is not None:
            return logps_of(trainer, trainer.ref_model, batch, batch_size, compute_entropy=False)[0]
        with trainer.model.disable_adapter():
            return logps_of(trainer, trainer.model, batch, batch_size, compute_entropy=False)[0]


def loss_and_grads(trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_close(actual, expected, rtol=1e-5, what=""):
    """Relative closeness at the tensor level: max abs error <= rtol * max abs value (plus a tiny floor)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * scale + 1e-10, f"{what}: max abs error {err:.3e} exceeds {rtol} x max |value| {scale:.3e}"


def dense_reference_mask(packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive ``(N, 1, L, L)`` mask (0 allowed, -inf hidden) of the packed layout.

    Passing it as ``attention_mask`` (with the packed ``position_ids``) to a model using stock ``sdpa`` or ``eager``
    reproduces the grouped forward densely, computing every masked sibling pair. It is additive on purpose: ``eager``
    adds the mask to the scores, so a boolean 4D mask would be added as 0/1 and silently give wrong results.
    """
    allowed = attention_allowed(packed.segment_ids)[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


def peak_backward_bytes(fn) -> int:
    """Peak bytes of live CPU tensors while ``fn().sum().backward()`` runs, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn().sum().backward()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = top = 0
    for event in events:
        live += event.nbytes()
        top = max(top, live)
    return top


QUANTIZED_FORMATS = ("bnb_4bit", "bnb_8bit", "torchao_int8")


def quantized_llama(fmt: str, directory) -> torch.nn.Module:
    """The sharpened tiny Llama (hidden 64: bitsandbytes' CPU blocks need 64 columns) loaded quantised in ``fmt``,
    computing in fp32."""
    from transformers import BitsAndBytesConfig, TorchAoConfig

    path = directory / "llama-64"
    if not path.exists():
        tiny_model("llama", num_key_value_heads=2, hidden_size=64, intermediate_size=128).save_pretrained(path)
    if fmt == "bnb_4bit":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    elif fmt == "bnb_8bit":
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:
        from torchao.quantization import Int8WeightOnlyConfig

        quantization = TorchAoConfig(quant_type=Int8WeightOnlyConfig())
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.float32)


def fp32_adapters_(trainer):
    """Cast the trained parameters to fp32. TRL casts adapters on quantised bases to bf16 (as QLoRA does), whose
    rounding would hide a difference of the size that fp32 comparisons catch; call before the optimizer exists."""
    for param in trainer.model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return trainer
