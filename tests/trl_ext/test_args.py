"""Plain TRL/transformers configs convert to each method's config (``trl_ext._args.convert_args``), keeping every
value given and the method's own defaults."""

import dataclasses

import pytest
from transformers import TrainingArguments
from trl import DPOConfig, SFTConfig

from peft_trl_testbed import make_mixed_quality_sft, make_reasoning_preferences, pretrained_toy_model_path, toy_args
from trl_ext import QTuningConfig, QTuningSFTTrainer, REDIConfig, REDITrainer
from trl_ext._args import convert_args


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


def test_token_fields_keep_their_values(tmp_path):
    """``TrainingArguments.to_dict`` masks every ``*_token`` field; the converted config has the real values."""
    # TRL deprecates ``pad_token``; the user's deprecated value still has to arrive, warning included.
    with pytest.warns(FutureWarning, match="pad_token"):
        args = toy_args(DPOConfig, tmp_path, pad_token="<|pad|>", hub_token="secret", learning_rate=2e-4)
    with pytest.warns(FutureWarning, match="pad_token"):
        converted = convert_args(args, REDIConfig, "REDITrainer")
    assert isinstance(converted, REDIConfig)
    assert (converted.pad_token, converted.hub_token, converted.learning_rate) == ("<|pad|>", "secret", 2e-4)
    with pytest.raises(TypeError, match=r"args is a dict; REDITrainer takes a REDIConfig"):
        convert_args({"output_dir": str(tmp_path)}, REDIConfig, "REDITrainer")
