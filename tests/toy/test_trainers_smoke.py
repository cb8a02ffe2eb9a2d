"""Every toy architecture builds, saves, reloads and runs stock TRL trainers offline."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from peft_trl_testbed import (
    ARCHITECTURES,
    arithmetic_reward,
    build_toy_model,
    make_arithmetic_dataset,
    toy_args,
    toy_model_path,
)

SIZES = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_build_save_reload_same_outputs(arch, tmp_path):
    model = build_toy_model(arch=arch, **SIZES).eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(5, 100, (2, 7))
    torch.testing.assert_close(model(ids).logits, reloaded(ids).logits, rtol=0, atol=0)
    assert reloaded.config.model_type == arch


def test_gpt2_uses_conv1d():
    from transformers.pytorch_utils import Conv1D

    model = build_toy_model(arch="gpt2", **SIZES)
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("conversational", [False, True])
def test_stock_sft_step(arch, conversational, tmp_path):
    path = toy_model_path(arch=arch, **SIZES)
    model = AutoModelForCausalLM.from_pretrained(path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = toy_args(SFTConfig, tmp_path, max_steps=1, per_device_train_batch_size=4, learning_rate=1e-2)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=make_arithmetic_dataset(8, conversational=conversational),
        processing_class=AutoTokenizer.from_pretrained(path),
    )
    trainer.train()
    assert trainer.state.global_step == 1
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_stock_grpo_step(arch, tmp_path):
    path = toy_model_path(arch=arch, **SIZES)
    args = toy_args(
        GRPOConfig, tmp_path, max_steps=1, per_device_train_batch_size=4, num_generations=4, max_completion_length=4
    )
    trainer = GRPOTrainer(
        model=path,
        reward_funcs=arithmetic_reward,
        args=args,
        train_dataset=make_arithmetic_dataset(8),
    )
    trainer.train()
    assert trainer.state.global_step == 1
    assert "reward" in trainer.state.log_history[0]
