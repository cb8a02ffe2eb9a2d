"""Trainer hardening: plain TRL configs convert, Q-Tuning normalises like SFTTrainer, REDI logs aux_loss, strict config."""

import copy
import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM, TrainingArguments
from trl import DPOConfig, SFTConfig, SFTTrainer

from peft_trl_testbed import make_mixed_quality_sft, make_reasoning_preferences, pretrained_toy_model_path, toy_args
from peft_trl_testbed.tokenizer import build_toy_tokenizer
from trl_ext import QTuningConfig, QTuningSFTTrainer, REDIConfig, REDITrainer


# 9 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config_cls", [SFTConfig, TrainingArguments])
def test_qtuning_trainer_converts_a_plain_config(tmp_path, config_cls):
    args = toy_args(config_cls, tmp_path, learning_rate=3e-3, max_steps=1, per_device_train_batch_size=4)
    trainer = QTuningSFTTrainer(
        model=pretrained_toy_model_path(), args=args, train_dataset=make_mixed_quality_sft(8, seed=3)
    )
    assert isinstance(trainer.args, QTuningConfig)
    assert (trainer.args.learning_rate, trainer.args.max_steps, trainer.args.per_device_train_batch_size) == (
        3e-3,
        1,
        4,
    )
    defaults = {f.name: f.default for f in dataclasses.fields(QTuningConfig)}  # a new config would reset accelerate
    for name in ("sample_keep_ratio", "token_keep_ratio", "neighbor_lambda", "scoring", "eu_record_steps"):
        assert getattr(trainer.args, name) == defaults[name]
    trainer.train()


def test_redi_trainer_converts_a_plain_dpo_config(tmp_path):
    args = toy_args(DPOConfig, tmp_path, learning_rate=3e-3, max_steps=1, per_device_train_batch_size=4)
    trainer = REDITrainer(
        model=pretrained_toy_model_path(), args=args, train_dataset=make_reasoning_preferences(8, seed=1)
    )
    assert isinstance(trainer.args, REDIConfig)
    assert (trainer.args.learning_rate, trainer.args.redi_alpha) == (3e-3, 0.8)
    trainer.train()


# 10 --------------------------------------------------------------------------------------------
def _run(trainer_cls, config_cls, tmp_path, grad_accum, **overrides):
    """Train the pretrained toy model for 2 plain SGD steps; returns (initial, final) parameters."""
    model = AutoModelForCausalLM.from_pretrained(pretrained_toy_model_path())
    initial = copy.deepcopy(model.state_dict())
    args = toy_args(
        config_cls,
        tmp_path / trainer_cls.__name__,
        per_device_train_batch_size=8 // grad_accum,
        gradient_accumulation_steps=grad_accum,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        disable_tqdm=True,
        **{"max_steps": 2, **overrides},
    )
    trainer = trainer_cls(model=model, args=args, train_dataset=make_mixed_quality_sft(32, seed=3))
    trainer.train()
    return initial, trainer.model.state_dict(), trainer


def _update_gap(initial, ours, stock):
    num = sum((ours[k] - stock[k]).float().norm() ** 2 for k in initial) ** 0.5
    den = sum((stock[k] - initial[k]).float().norm() ** 2 for k in initial) ** 0.5
    return float(num / den)


@pytest.mark.parametrize("scoring", ["separate", "reuse"])
def test_qtuning_at_full_ratios_equals_sft_with_gradient_accumulation(tmp_path, scoring):
    initial, stock, _ = _run(SFTTrainer, SFTConfig, tmp_path, grad_accum=2)
    _, ours, _ = _run(
        QTuningSFTTrainer,
        QTuningConfig,
        tmp_path,
        grad_accum=2,
        sample_keep_ratio=1.0,
        token_keep_ratio=1.0,
        scoring=scoring,
    )
    gap = _update_gap(initial, ours, stock)
    assert gap < 1e-5, f"update differs from SFTTrainer's by {gap:.2e} (relative)"


class _RecordingQTuning(QTuningSFTTrainer):
    """Records each training micro-batch with the tokens Q-Tuning kept."""

    def select(self, inputs, log_probs, entropy):
        selection = super().select(inputs, log_probs, entropy)
        self.recorded.append(({k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)}, selection))
        return selection


@pytest.mark.parametrize("scoring", ["separate", "reuse"])
def test_qtuning_window_loss_is_normalised_by_kept_tokens(tmp_path, scoring):
    """Reference: one SGD step on sum(kept NLL over the window) / (kept tokens in the window)."""
    _RecordingQTuning.recorded = []
    initial, ours, trainer = _run(
        _RecordingQTuning,
        QTuningConfig,
        tmp_path,
        grad_accum=2,
        sample_keep_ratio=0.5,
        token_keep_ratio=0.5,
        scoring=scoring,
    )
    first_window = _RecordingQTuning.recorded[:2]
    model = AutoModelForCausalLM.from_pretrained(pretrained_toy_model_path())
    model.load_state_dict(initial)
    total, kept = 0.0, 0
    for inputs, selection in first_window:
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
        nll = -torch.log_softmax(logits.float(), -1).gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
        total = total + (nll * selection.token_keep).sum()
        kept += int(selection.token_keep.sum())
    sizes = [int(s.token_keep.sum()) for _, s in first_window]
    assert sizes[0] != sizes[1]  # otherwise per-micro-batch means would normalise the same way
    (total / kept).backward()
    expected = {n: initial[n] - 0.5 * p.grad for n, p in model.named_parameters() if p.grad is not None}

    # Compare after the first step only: rerun with max_steps=1.
    _RecordingQTuning.recorded = []
    _, one_step, _ = _run(
        _RecordingQTuning,
        QTuningConfig,
        tmp_path / "one",
        grad_accum=2,
        sample_keep_ratio=0.5,
        token_keep_ratio=0.5,
        scoring=scoring,
        max_steps=1,
    )
    gap = _update_gap({k: initial[k] for k in expected}, {k: one_step[k] for k in expected}, expected)
    assert gap < 1e-4, f"update differs from the kept-token-normalised reference by {gap:.2e} (relative)"


# 11 --------------------------------------------------------------------------------------------
def test_redi_logs_aux_loss_on_moe_models(tmp_path):
    tokenizer = build_toy_tokenizer()
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.01,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config)
    args = toy_args(REDIConfig, tmp_path, max_steps=1, per_device_train_batch_size=4)
    trainer = REDITrainer(
        model=model, args=args, train_dataset=make_reasoning_preferences(4, seed=1), processing_class=tokenizer
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "aux_loss" in entry]
    assert logged and logged[0]["aux_loss"] > 0


# 12 --------------------------------------------------------------------------------------------
NON_DEFAULT = {
    "beta": 0.5,
    "loss_type": ["ipo"],
    "loss_weights": [1.0],
    "label_smoothing": 0.1,
    "precompute_ref_log_probs": True,
    "precompute_ref_batch_size": 8,
    "sync_ref_model": True,
    "ref_model_mixup_alpha": 0.9,
    "ref_model_sync_steps": 64,
    "ld_alpha": 0.5,
    "f_divergence_type": "js_divergence",
    "f_alpha_divergence_coef": 0.3,
    "discopop_tau": 0.1,
    "use_weighting": True,
}


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_redi_config_refuses_dpo_only_options(tmp_path, name):
    with pytest.raises(ValueError, match=rf"REDIConfig got {name}=.*Remove {name}"):
        toy_args(REDIConfig, tmp_path, **{name: NON_DEFAULT[name]})


def test_redi_config_accepts_dpo_defaults_and_refuses_a_bool_alpha(tmp_path):
    toy_args(REDIConfig, tmp_path, beta=0.1, loss_type="sigmoid", f_divergence_type="reverse_kl")
    with pytest.raises(ValueError, match=r"redi_alpha=True is a bool"):
        toy_args(REDIConfig, tmp_path, redi_alpha=True)
