"""Q-Tuning trainer (``trl_ext.qtuning.trainer``): at full keep ratios it equals SFTTrainer, and its loss over an
accumulation window is normalised by the tokens it kept."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from peft_trl_testbed import build_toy_tokenizer, make_mixed_quality_sft, pretrained_toy_model_path, toy_args
from trl_ext import QTuningConfig, QTuningSFTTrainer


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


def test_evaluating_on_a_4bit_base_leaves_training_unchanged(tmp_path):
    """bitsandbytes repacks 4-bit weights on an eval forward on CPU for a kernel that passes no gradient back; the
    trainer keeps them in their training layout, so a step after ``evaluate()`` equals a step without it, and at full
    keep ratios equals stock SFTTrainer's step without evaluation."""
    from peft import LoraConfig
    from prefix_grouper_helpers import fp32_adapters_, quantized_llama

    from peft_ext._quantized import repacked_4bit_layers

    data = make_mixed_quality_sft(8, seed=3)
    runs = {  # name: (trainer, config, evaluate first, Q-Tuning options)
        "plain": (QTuningSFTTrainer, QTuningConfig, False, {}),
        "evaluated": (QTuningSFTTrainer, QTuningConfig, True, {}),
        "full-ratios-evaluated": (
            QTuningSFTTrainer,
            QTuningConfig,
            True,
            dict(sample_keep_ratio=1.0, token_keep_ratio=1.0),
        ),
        "stock": (SFTTrainer, SFTConfig, False, {}),
    }
    updates = {}
    for run, (trainer_cls, config_cls, evaluate, options) in runs.items():
        args = toy_args(
            config_cls,
            tmp_path / run,
            per_device_train_batch_size=8,
            per_device_eval_batch_size=8,
            optim="sgd",
            learning_rate=0.5,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            max_steps=1,
            disable_tqdm=True,
            **options,
        )
        trainer = trainer_cls(
            model=quantized_llama("bnb_4bit", tmp_path),
            args=args,
            train_dataset=data,
            eval_dataset=data,
            peft_config=LoraConfig(
                r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False
            ),
            processing_class=build_toy_tokenizer(),
        )
        fp32_adapters_(trainer)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        if evaluate:
            trainer.evaluate()
            assert repacked_4bit_layers(trainer.model) == []
        trainer.train()
        updates[run] = {n: p.detach() - before[n] for n, p in trainer.model.named_parameters() if n in before}
    assert all(update.abs().max() > 0 for update in updates["plain"].values())  # every adapter tensor trained
    for name, update in updates["plain"].items():
        torch.testing.assert_close(updates["evaluated"][name], update, rtol=1e-6, atol=1e-9, msg=name)
    # Against the stock trainer, which never evaluated: the same update, to the fp32 tolerance of the full-ratio test
    gap = _update_gap({n: 0 for n in updates["stock"]}, updates["full-ratios-evaluated"], updates["stock"])
    assert gap < 1e-5, f"update differs from SFTTrainer's by {gap:.2e} (relative)"


def test_a_4bit_base_repacked_before_the_trainer_is_refused(tmp_path):
    from bitsandbytes.functional import has_avx512bf16
    from peft import LoraConfig
    from prefix_grouper_helpers import quantized_llama

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    model = quantized_llama("bnb_4bit", tmp_path)
    model.eval()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))  # as a baseline evaluation would, before the trainer exists
    args = toy_args(QTuningConfig, tmp_path / "out", max_steps=1)
    with pytest.raises(ValueError, match=r"repacked the weights of 14 4-bit layer\(s\).*Reload the model"):
        QTuningSFTTrainer(
            model=model,
            args=args,
            train_dataset=make_mixed_quality_sft(8),
            peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
            processing_class=build_toy_tokenizer(),
        )
