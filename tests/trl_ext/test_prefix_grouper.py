"""PrefixGrouperGRPOTrainer against the stock trl.GRPOTrainer on identical models and batches (fp32).

Every comparison is relative at the tensor level (max abs error <= 1e-5 x max abs value): per-token log-probs,
entropies, old and reference log-probs, the loss and every parameter gradient.
"""

import pytest
import torch
from prefix_grouper_helpers import (
    QUANTIZED_FORMATS,
    assert_close,
    fp32_adapters_,
    logps_of,
    loss_and_grads,
    make_batch,
    make_trainer,
    model_path,
    quantized_llama,
    ref_logps_of,
    sharpen_,
    trainer_for_model,
)
from transformers import AutoModelForCausalLM, Qwen3MoeConfig
from trl import GRPOConfig, GRPOTrainer

from peft_ext._quantized import repacked_4bit_layers
from peft_trl_testbed import arithmetic_reward, build_toy_tokenizer, make_arithmetic_dataset, toy_args, toy_model_path
from trl_ext import PrefixGrouperGRPOConfig, PrefixGrouperGRPOTrainer
from trl_ext.prefix_grouper import install_grouped_attention

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]


def compare(stock, grouped, batch, batch_size=None):
    """Log-probs, entropies, reference log-probs, loss and gradients of both trainers on ``batch``."""
    with torch.no_grad():
        s_logps, s_ent, _ = logps_of(stock, stock.model, batch, batch_size)
        g_logps, g_ent, _ = logps_of(grouped, grouped.model, batch, batch_size)
    assert_close(g_logps, s_logps, what="log-probs")
    assert_close(g_ent, s_ent, what="entropies")
    assert s_logps[batch["completion_mask"].bool()].abs().min() > 0  # every scored token was scored
    if stock.beta != 0.0:
        s_ref, g_ref = ref_logps_of(stock, batch, batch_size), ref_logps_of(grouped, batch, batch_size)
        assert_close(g_ref, s_ref, what="reference log-probs")
        batch = {**batch, "ref_per_token_logps": s_ref}
    if stock.num_iterations > 1:
        # Old log-probs from an earlier policy: perturb them so that the ratios clip
        noise = torch.randn(s_logps.shape, generator=torch.Generator().manual_seed(1)) * 0.3
        batch = {**batch, "old_per_token_logps": s_logps + noise}
    s_loss, s_grads = loss_and_grads(stock, batch)
    g_loss, g_grads = loss_and_grads(grouped, batch)
    assert_close(g_loss, s_loss, what="loss")
    assert s_grads.keys() == g_grads.keys()
    for name in s_grads:
        assert_close(g_grads[name], s_grads[name], what=f"grad of {name}")
    assert any(g.abs().max() > 0 for g in s_grads.values())


def pair(tmp_path, **kwargs):
    stock = make_trainer(False, tmp_path, **kwargs)
    grouped = make_trainer(True, tmp_path, **kwargs)
    for trainer in (stock, grouped):
        if trainer.ref_model is not None:
            sharpen_(trainer.ref_model, seed=1)
    return stock, grouped


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_matches_stock_per_architecture(arch, attn, tmp_path):
    stock, grouped = pair(tmp_path, arch=arch, attn=attn)
    assert grouped.model.config._attn_implementation == f"prefix_grouper_{attn}"
    compare(stock, grouped, make_batch())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_stock_every_loss_type_with_reference_and_old_logps(loss_type, tmp_path):
    level = "sequence" if loss_type in ("luspo",) else "token"
    extra = {"entropy_coef": 0.01} if loss_type == "grpo" else {}
    if loss_type == "bnpo":
        extra = {"top_entropy_quantile": 0.5}
    stock, grouped = pair(
        tmp_path, loss_type=loss_type, beta=0.1, num_iterations=2, importance_sampling_level=level, **extra
    )
    assert stock.beta == 0.1 and stock.ref_model is not None and grouped.ref_model is not None
    assert grouped.ref_model.config._attn_implementation == "prefix_grouper_sdpa"
    compare(stock, grouped, make_batch(seed=3))


def test_groups_split_across_chunks_and_larger_than_the_chunk(tmp_path):
    # 8 rows, three interleaved groups; scored 3 rows per forward (as TRL does for old/reference log-probs with
    # per_device_train_batch_size=3), so groups are split over forwards. Then groups larger than the packing limit.
    stock, grouped = pair(tmp_path, beta=0.1, num_iterations=2)
    batch = make_batch(seed=5, rows="abcabcab")
    compare(stock, grouped, batch, batch_size=3)
    with torch.no_grad():
        expected = logps_of(stock, stock.model, batch)[0]
        grouped.prefix_grouper_max_completions = 2
        assert_close(logps_of(grouped, grouped.model, batch, batch_size=8)[0], expected, what="max_completions=2")


def test_masked_truncated_completion(tmp_path):
    stock, grouped = pair(tmp_path)
    compare(stock, grouped, make_batch(seed=7, truncated_row=2))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing(use_reentrant, tmp_path):
    stock, grouped = pair(tmp_path)
    for trainer in (stock, grouped):  # what Trainer.train() does with gradient_checkpointing=True
        trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        assert trainer.model.is_activation_checkpointing
    compare(stock, grouped, make_batch(seed=2))


def peft_configs():
    from peft import LoraConfig

    configs = [pytest.param(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]), id="lora")]
    try:
        from peft_ext import MoraConfig
    except ImportError:  # built separately; the LoRA case must run regardless
        return configs
    configs.append(pytest.param(MoraConfig(r=8, target_modules=["q_proj", "v_proj", "up_proj"]), id="mora"))
    return configs


@pytest.mark.parametrize("peft_config", peft_configs())
def test_peft_adapter_with_reference_from_disabled_adapter(peft_config, tmp_path):
    stock, grouped = pair(tmp_path, peft_config=peft_config, beta=0.1)
    assert stock.ref_model is None and grouped.ref_model is None  # reference = adapter disabled
    # A fresh adapter starts at the base model: nudge it so the policy and reference differ
    for trainer in (stock, grouped):
        gen = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for param in trainer.model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    compare(stock, grouped, make_batch(seed=4))


def test_accepts_plain_grpo_config(tmp_path):
    grouped = make_trainer(True, tmp_path, plain_config=True)
    assert type(grouped.args) is GRPOConfig
    assert grouped.model.config._attn_implementation == "prefix_grouper_sdpa"


def test_disabled_is_the_stock_path(tmp_path):
    grouped = make_trainer(True, tmp_path, prefix_grouper=False)
    assert grouped.model.config._attn_implementation == "sdpa"


def test_training_steps_match_stock(tmp_path):
    """Generation, old and reference log-probs, two optimizer steps: the same logs as the stock trainer."""
    settings = dict(
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        num_generations=4,
        num_iterations=2,
        beta=0.05,
        learning_rate=1e-3,
        max_completion_length=6,
    )

    def length_reward(completions, **kwargs):  # varies between completions, so advantages are non-zero
        return [float(len(c)) for c in completions]

    logs = []
    for grouped in (False, True):
        trainer = make_trainer(grouped, tmp_path, reward_funcs=length_reward, **settings)
        sharpen_(trainer.ref_model, seed=1)
        trainer.train()
        logs.append(trainer.state.log_history)
    assert len(logs[0]) == len(logs[1]) >= 2
    assert logs[0][0]["reward_std"] > 0
    for stock_log, grouped_log in zip(logs[0][:2], logs[1][:2]):
        assert stock_log.keys() == grouped_log.keys()
        for key in ("loss", "grad_norm", "kl", "entropy", "clip_ratio/region_mean"):
            assert grouped_log[key] == pytest.approx(stock_log[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("implementation", ["flex_attention", "flash_attention_2"])
def test_rejects_unsupported_attention_implementation(implementation, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(toy_model_path(arch="qwen2", hidden_size=32, num_hidden_layers=1))
    model.config._attn_implementation = implementation  # as loading with it on a GPU machine would set
    with pytest.raises(ValueError, match=rf"model_type='qwen2'.*{implementation}.*stock `trl.GRPOTrainer`"):
        install_grouped_attention(model)
    # and through the trainer, at construction
    args = toy_args(PrefixGrouperGRPOConfig, tmp_path, per_device_train_batch_size=4, num_generations=4)
    with pytest.raises(ValueError, match=rf"model_type='qwen2'.*{implementation}.*stock `trl.GRPOTrainer`"):
        PrefixGrouperGRPOTrainer(
            model=model, reward_funcs=arithmetic_reward, args=args, train_dataset=make_arithmetic_dataset(8)
        )


def tiny_moe(router_aux_loss_coef):
    config = Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        router_aux_loss_coef=router_aux_loss_coef,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return sharpen_(AutoModelForCausalLM.from_config(config))


def test_rejects_moe_load_balancing_loss_at_construction(tmp_path):
    args = toy_args(PrefixGrouperGRPOConfig, tmp_path, per_device_train_batch_size=4, num_generations=4)
    with pytest.raises(
        ValueError, match=r"model_type='qwen3_moe'.*router_aux_loss_coef=0.01.*stock `trl.GRPOTrainer`"
    ):
        PrefixGrouperGRPOTrainer(
            model=tiny_moe(0.01),
            reward_funcs=arithmetic_reward,
            args=args,
            train_dataset=make_arithmetic_dataset(8),
            processing_class=build_toy_tokenizer(),
        )


def test_moe_without_load_balancing_loss_matches_stock(tmp_path):
    # Routing is per token, so the packed forward routes every token as the stock forward does
    trainers = []
    for grouped in (False, True):
        config_cls, trainer_cls = (
            (PrefixGrouperGRPOConfig, PrefixGrouperGRPOTrainer) if grouped else (GRPOConfig, GRPOTrainer)
        )
        args = toy_args(
            config_cls,
            tmp_path / str(grouped),
            per_device_train_batch_size=8,
            num_generations=4,
            max_completion_length=7,
            disable_dropout=True,
            router_aux_loss_coef=0.0,
        )
        trainer = trainer_cls(
            model=tiny_moe(0.01),
            reward_funcs=arithmetic_reward,
            args=args,
            train_dataset=make_arithmetic_dataset(8),
            processing_class=build_toy_tokenizer(),
        )
        trainer.current_gradient_accumulation_steps = 1
        trainer.model.train()
        trainers.append(trainer)
    assert not trainers[1].aux_loss_enabled
    compare(*trainers, make_batch(seed=9))


def drop_layout_kwarg(model):
    attn = model.model.layers[0].self_attn
    forward = attn.forward
    attn.forward = lambda *a, prefix_grouper_layout=None, **kw: forward(*a, **kw)  # a model that drops kwargs
    return model


def test_rejects_attention_layers_that_drop_the_layout_at_construction(tmp_path):
    model = drop_layout_kwarg(sharpen_(AutoModelForCausalLM.from_pretrained(model_path("llama"))))
    args = toy_args(PrefixGrouperGRPOConfig, tmp_path, per_device_train_batch_size=4, num_generations=4)
    with pytest.raises(ValueError, match=r"model_type='llama'.*keyword arguments.*stock `trl.GRPOTrainer`"):
        PrefixGrouperGRPOTrainer(
            model=model, reward_funcs=arithmetic_reward, args=args, train_dataset=make_arithmetic_dataset(8)
        )


def test_rejects_attention_layers_that_drop_the_layout_later(tmp_path):
    grouped = make_trainer(True, tmp_path)
    drop_layout_kwarg(grouped.model)
    with pytest.raises(ValueError, match=r"model_type='llama'.*keyword arguments.*stock `trl.GRPOTrainer`"):
        logps_of(grouped, grouped.model, make_batch())


def test_bf16_drift_is_no_worse_than_stock(tmp_path):
    """Under bf16 autocast, the grouped gradient is within 2x the stock bf16 gradient's distance from fp32."""
    batch = make_batch(seed=12)

    def gradient(trainer):
        trainer.model.zero_grad(set_to_none=True)
        with trainer.accelerator.autocast():
            loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        return torch.cat([p.grad.flatten().double() for p in trainer.model.parameters() if p.requires_grad])

    reference = gradient(make_trainer(False, tmp_path / "fp32"))
    drift = {}
    for grouped in (False, True):
        trainer = make_trainer(grouped, tmp_path / f"bf16-{grouped}", bf16=True, use_cpu=True)
        assert trainer.accelerator.mixed_precision == "bf16"
        drift[grouped] = ((gradient(trainer) - reference).norm() / reference.norm()).item()
    assert drift[False] > 1e-4  # autocast really ran in bf16: the stock update moved
    assert drift[True] <= 2 * drift[False], drift


def test_rejects_multimodal_inputs(tmp_path):
    grouped = make_trainer(True, tmp_path)
    batch = make_batch()
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with pytest.raises(ValueError, match=r"text-only.*pixel_values"):
        grouped._get_per_token_logps_and_entropies(grouped.model, input_ids, mask, 7, pixel_values=torch.ones(1))


def test_config_validates_max_completions():
    with pytest.raises(ValueError, match="prefix_grouper_max_completions=0"):
        toy_args(PrefixGrouperGRPOConfig, "out", prefix_grouper_max_completions=0)


def test_trainer_from_model_path_trains(tmp_path):
    args = toy_args(
        PrefixGrouperGRPOConfig,
        tmp_path,
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=4,
    )
    path = toy_model_path(arch="qwen2", hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    trainer = PrefixGrouperGRPOTrainer(
        model=path, reward_funcs=arithmetic_reward, args=args, train_dataset=make_arithmetic_dataset(8)
    )
    trainer.train()
    assert trainer.state.global_step == 1


@pytest.mark.parametrize("fmt", QUANTIZED_FORMATS)
def test_quantised_base_with_lora_matches_stock(fmt, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    stock, grouped = (
        fp32_adapters_(trainer_for_model(quantized_llama(fmt, tmp_path), grouped, tmp_path, peft_config=lora))
        for grouped in (False, True)
    )
    # The self-check's eval forwards leave the weights as loaded: bitsandbytes would repack 4-bit ones for a kernel
    # through which training gets no gradient (every LoRA tensor below the last layer would miss its gradient)
    assert repacked_4bit_layers(grouped.model) == []
    compare(stock, grouped, make_batch())
