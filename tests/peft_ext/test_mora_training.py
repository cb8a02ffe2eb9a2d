"""MoRA in training: TRL's SFTTrainer, gradient checkpointing, and the ReMoRA callback."""

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerState
from trl import SFTConfig, SFTTrainer

from peft_ext import MoraConfig, ReMoraCallback
from peft_ext.mora import MoraLinear
from peft_trl_testbed.data import make_uuid_dataset
from peft_trl_testbed.models import toy_model_path

SIZES = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
IDS = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(0))


def sft_trainer(tmp_path, mora_type, max_steps, callbacks=(), **args):
    path = toy_model_path(arch="llama", **SIZES)
    torch.manual_seed(0)
    config = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        bf16=False,  # SFTConfig defaults to bf16 and gradient checkpointing; the tests choose explicitly
        **{"activation_checkpointing": False, **args},
    )
    return SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(path),
        args=config,
        train_dataset=make_uuid_dataset(8, seed=0),
        processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=MoraConfig(r=4, mora_type=mora_type, target_modules="all-linear"),
        callbacks=list(callbacks),
    )


def losses(trainer):
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


@pytest.mark.parametrize("mora_type", ["rotation", "sharing"])
def test_sft_trainer_loss_goes_down(tmp_path, mora_type):
    trainer = sft_trainer(tmp_path, mora_type, max_steps=8)
    trainer.train()
    history = losses(trainer)
    # the random toy model's frozen head caps the gain (about 4.61 -> 4.48); a working adapter gets there
    assert history[-1] < history[0] - 0.05, history
    layer = next(m for m in trainer.model.modules() if isinstance(m, MoraLinear))
    assert layer.mora_M["default"].abs().sum() > 0


def test_sft_trainer_with_gradient_checkpointing(tmp_path):
    trainer = sft_trainer(tmp_path, "rotation", max_steps=6, activation_checkpointing=True)
    trainer.train()
    history = losses(trainer)
    assert history[-1] < history[0], history


def test_gradient_checkpointing_gives_the_same_gradients():
    path = toy_model_path(arch="llama", **SIZES)
    grads = []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(path)
        torch.manual_seed(0)  # same random M in both runs
        model = get_peft_model(model, MoraConfig(r=4, target_modules="all-linear", init_weights=False))
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
        model.train()
        model(IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- ReMoRA
def test_remora_restart_merges_resets_and_switches_operator():
    path = toy_model_path(arch="llama", **SIZES)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path),
        MoraConfig(r=4, mora_type=1, target_modules="all-linear", init_weights=False),
    ).eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(IDS, labels=IDS).loss.backward()
    optimizer.step()
    assert optimizer.state[layer.mora_M["default"]]["exp_avg"].abs().sum() > 0
    base_weight = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        before = model(IDS).logits

    callback = ReMoraCallback(every_n_steps=2)
    state = TrainerState(global_step=1)
    callback.on_step_end(None, state, None, model=model, optimizer=optimizer)
    assert callback.num_restarts == 0  # not a multiple of every_n_steps
    state.global_step = 2
    callback.on_step_end(None, state, None, model=model, optimizer=optimizer)

    assert callback.num_restarts == 1
    assert torch.all(layer.mora_M["default"] == 0)
    assert layer.mora_type["default"] == "group_interleave" == model.peft_config["default"].mora_type
    assert not torch.equal(layer.base_layer.weight, base_weight)  # the update now lives in W0
    assert not layer.merged  # nothing left to unmerge
    assert torch.all(optimizer.state[layer.mora_M["default"]]["exp_avg"] == 0)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, before, rtol=1e-4, atol=1e-5)
    assert callback.restart(model) == "sharing"  # and back: 1 <-> 2


def test_remora_callback_inside_sft_trainer(tmp_path):
    callback = ReMoraCallback(every_n_steps=3)
    trainer = sft_trainer(tmp_path, "sharing", max_steps=7, callbacks=[callback])
    trainer.train()
    assert callback.num_restarts == 2
    assert trainer.model.peft_config["default"].mora_type == "sharing"  # switched twice
    history = losses(trainer)
    assert history[-1] < history[0], history


def test_remora_errors_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match="every_n_steps=0"):
        ReMoraCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="mora_type='nope'"):
        ReMoraCallback(every_n_steps=1, cycle=("sharing", "nope"))
    path = toy_model_path(arch="llama", **SIZES)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), MoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"mora_type='rotation', which is not in cycle"):
        ReMoraCallback(every_n_steps=1).restart(model)
    with pytest.raises(ValueError, match=r"change r_hat from 10 to 11"):  # 32x32, r=2: rotation 10, sharing 11
        ReMoraCallback(every_n_steps=1, cycle=("rotation", "sharing")).restart(model)
    with pytest.raises(ValueError, match="found no MoRA adapter"):
        ReMoraCallback(every_n_steps=1).restart(AutoModelForCausalLM.from_pretrained(path))


@pytest.mark.parametrize("engine", ["deepspeed", "fsdp"])
def test_remora_callback_refuses_sharding_engines_before_training(tmp_path, engine):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    if engine == "deepspeed":
        settings = {"deepspeed": {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}}
    else:
        settings = {"fsdp": "full_shard", "fsdp_config": {"version": 2}}
    try:
        args = TrainingArguments(str(tmp_path), report_to="none", **settings)
        with pytest.raises(
            ValueError, match=f"cannot restart under {'DeepSpeed' if engine == 'deepspeed' else 'FSDP'}"
        ):
            ReMoraCallback(every_n_steps=2).on_train_begin(args, TrainerState(), TrainerControl())
    finally:  # TrainingArguments(deepspeed=...) switches ZeRO init on for this process until unset
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
