"""TRL's trainer contracts, checked for every trainer of this package against its parent.

Each row of ``ROWS`` is one trainer (Prefix Grouper GRPO, prefix-shared DPO, REDI, Q-Tuning) with its parent, config classes,
datasets and model-card tags; each contract runs once per row. A contract either works as it does for
the parent trainer or is refused at construction with a clear message, and the refusals are named
(with their reason) in the row. The models are the tiny random toy Llama; one or two steps each.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from peft_trl_testbed import (
    make_arithmetic_dataset,
    make_reasoning_preferences,
    toy_args,
    toy_model_path,
)
from trl_ext import (
    PrefixGrouperGRPOConfig,
    PrefixGrouperGRPOTrainer,
    PrefixSharingDPOConfig,
    PrefixSharingDPOTrainer,
    QTuningConfig,
    QTuningSFTTrainer,
    REDIConfig,
    REDITrainer,
)

MODEL = dict(arch="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


def model_path():
    return toy_model_path(**MODEL)


def length_reward(completions, **kwargs):
    """Differs between completions, so GRPO's advantages are not all zero."""
    return [float(len(c if isinstance(c, str) else c[-1]["content"])) for c in completions]


def conversational_preferences(n):
    rows = make_reasoning_preferences(n, seed=1)
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p in rows["prompt"]],
            "chosen": [[{"role": "assistant", "content": c}] for c in rows["chosen"]],
            "rejected": [[{"role": "assistant", "content": c}] for c in rows["rejected"]],
        }
    )


# --------------------------------------------------------------------------- rows
@dataclasses.dataclass
class TrainerRow:
    """One trainer of this package and what TRL's contracts need to know about it.

    ``build(config_cls, tmp_path, train_dataset, **kwargs)`` constructs the trainer (``kwargs``: config
    overrides plus ``peft_config``/``eval_dataset``); ``prompt_learning_refusal`` is the reason the
    trainer refuses prompt-learning adapters, a phrase of its error message (``None``: it trains with them, checked
    against a closed form).
    """

    id: str
    trainer_cls: type
    config_cls: type
    parent_config_cls: type
    build: Callable[..., object]
    standard: Callable[[int], Dataset]
    conversational: Callable[[int], Dataset]
    tags: tuple[str, ...]
    prompt_learning_refusal: str | None


def _build_grpo(trainer_cls):
    def build(
        config_cls,
        tmp_path,
        train_dataset,
        peft_config=None,
        eval_dataset=None,
        reward=length_reward,
        model=None,
        **kw,
    ):
        kw = {
            "max_steps": 1,
            "per_device_train_batch_size": 2,
            "per_device_eval_batch_size": 2,
            "num_generations": 2,
            "max_completion_length": 3,
            "learning_rate": 1e-2,
            **kw,
        }
        return trainer_cls(
            model=model if model is not None else model_path(),
            reward_funcs=reward,
            args=toy_args(config_cls, tmp_path / "out", **kw),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            peft_config=peft_config,
        )

    return build


def _build_simple(trainer_cls):
    def build(config_cls, tmp_path, train_dataset, peft_config=None, eval_dataset=None, model=None, **kw):
        defaults = dict(max_steps=1, per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=1e-2)
        kw = {**defaults, **kw}
        return trainer_cls(
            model=model if model is not None else model_path(),
            args=toy_args(config_cls, tmp_path / "out", **kw),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            peft_config=peft_config,
        )

    return build


ROWS = [
    TrainerRow(
        id="prefix_grouper",
        trainer_cls=PrefixGrouperGRPOTrainer,
        config_cls=PrefixGrouperGRPOConfig,
        parent_config_cls=GRPOConfig,
        build=_build_grpo(PrefixGrouperGRPOTrainer),
        standard=lambda n: make_arithmetic_dataset(n, seed=2),
        conversational=lambda n: make_arithmetic_dataset(n, seed=2, conversational=True),
        tags=("trl", "grpo", "prefix-grouper", "peft-trl-ext"),
        prompt_learning_refusal="the packed shared-prefix rows do not hold",
    ),
    TrainerRow(
        id="prefix_sharing_dpo",
        trainer_cls=PrefixSharingDPOTrainer,
        config_cls=PrefixSharingDPOConfig,
        parent_config_cls=DPOConfig,
        build=_build_simple(PrefixSharingDPOTrainer),
        standard=lambda n: make_reasoning_preferences(n, seed=1),
        conversational=conversational_preferences,
        tags=("trl", "dpo", "prefix-sharing", "peft-trl-ext"),
        prompt_learning_refusal="the packed shared-prefix rows do not hold",
    ),
    TrainerRow(
        id="redi",
        trainer_cls=REDITrainer,
        config_cls=REDIConfig,
        parent_config_cls=DPOConfig,
        build=_build_simple(REDITrainer),
        standard=lambda n: make_reasoning_preferences(n, seed=1),
        conversational=conversational_preferences,
        tags=("trl", "redi", "peft-trl-ext"),
        prompt_learning_refusal=None,
    ),
    TrainerRow(
        id="qtuning",
        trainer_cls=QTuningSFTTrainer,
        config_cls=QTuningConfig,
        parent_config_cls=SFTConfig,
        build=_build_simple(QTuningSFTTrainer),
        standard=lambda n: make_arithmetic_dataset(n, seed=2),
        conversational=lambda n: make_arithmetic_dataset(n, seed=2, conversational=True),
        tags=("trl", "sft", "q-tuning", "peft-trl-ext"),
        prompt_learning_refusal="per-token scores and token pruning do not account for",
    ),
]


@pytest.fixture(params=ROWS, ids=[row.id for row in ROWS])
def row(request):
    return request.param


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before):
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def train_one_step(trainer):
    before = snapshot(trainer.model)
    trainer.train()
    assert trainer.state.global_step == 1
    loss = trainer.state.log_history[0]["loss"]
    assert math.isfinite(loss)
    return changed(trainer.model, before)


# --------------------------------------------------------------------------- contracts
def test_trains_with_the_method_config(row, tmp_path):
    trainer = row.build(row.config_cls, tmp_path, row.standard(8))
    assert type(trainer.args) is row.config_cls
    assert train_one_step(trainer)


def test_trains_with_the_parent_config(row, tmp_path):
    """A plain parent config is accepted as the parent trainer accepts it (the method's options at defaults)."""
    trainer = row.build(row.parent_config_cls, tmp_path, row.standard(8))
    assert isinstance(trainer.args, row.parent_config_cls)
    assert train_one_step(trainer)


def test_lora_trains_only_the_adapter(row, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = row.build(row.config_cls, tmp_path, row.standard(8), peft_config=lora)
    assert isinstance(trainer.model, PeftModel)
    updated = train_one_step(trainer)
    assert updated and all("lora_" in n for n in updated), sorted(updated)


PROMPT_LEARNING = [
    PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16),
]


@pytest.mark.parametrize("peft_config", PROMPT_LEARNING, ids=lambda c: type(c).__name__)
def test_prompt_learning_adapters_are_refused_or_exact(row, tmp_path, peft_config):
    if row.prompt_learning_refusal is not None:  # refused by design, at construction
        pattern = rf"{type(peft_config).__name__}.*prompt-learning.*{row.prompt_learning_refusal}.*LoRA"
        with pytest.raises(ValueError, match=pattern):
            row.build(row.config_cls, tmp_path, row.standard(8), peft_config=peft_config)
        # the same for a model that already carries such an adapter
        wrapped = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path()), peft_config)
        with pytest.raises(ValueError, match=pattern.replace("peft_config", "")):
            row.build(row.config_cls, tmp_path, row.standard(8), model=wrapped)
        return
    # REDI supports them: its loss on a batch equals the closed form computed from the adapted model's logits
    trainer = row.build(row.config_cls, tmp_path, row.standard(8), peft_config=peft_config)
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    loss = trainer.compute_loss(model, batch)
    with torch.no_grad():
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1] :][:, :-1]  # drop virtual tokens
        logps = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        completion = batch["completion_mask"][:, 1:].float()
        sums, lengths = (logps * completion).sum(-1), completion.sum(-1)
    n = ids.shape[0] // 2
    alpha = trainer.args.redi_alpha
    expected = torch.stack([-sums[i] / lengths[i] + alpha * sums[n + i] / lengths[n + i] for i in range(n)]).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert train_one_step(trainer)


def test_conversational_data(row, tmp_path):
    trainer = row.build(row.config_cls, tmp_path, row.conversational(8))
    assert train_one_step(trainer)


def test_iterable_dataset(row, tmp_path):
    trainer = row.build(row.config_cls, tmp_path, row.standard(8).to_iterable_dataset())
    assert train_one_step(trainer)


def test_evaluation(row, tmp_path):
    train = row.standard(8)
    eval_dataset = row.standard(4) if row.id != "prefix_grouper" else row.standard(1)  # one group of 2 completions
    trainer = row.build(row.config_cls, tmp_path, train, eval_dataset=eval_dataset)
    before = snapshot(trainer.model)
    metrics = trainer.evaluate()
    assert not changed(trainer.model, before)
    assert math.isfinite(metrics["eval_loss"])
    if row.id == "prefix_grouper":
        assert "eval_reward" in metrics
    else:
        assert metrics["eval_loss"] > 0


def test_model_card_tags(row, tmp_path):
    """What push_to_hub would upload: the model card's tags (no network)."""
    trainer = row.build(row.config_cls, tmp_path, row.standard(8))
    assert tuple(trainer._tag_names) == row.tags
    trainer.create_model_card(model_name="toy")
    card = (tmp_path / "out" / "README.md").read_text()
    header = card.split("---")[1]
    for tag in row.tags:
        assert f"- {tag}\n" in header, (tag, header)


def test_gradient_accumulation_and_iterations_match_the_reference(row, tmp_path):
    """One optimizer step over two accumulated micro-batches (and, for GRPO, two iterations per generation).

    References: Prefix Grouper against the stock GRPOTrainer with the same settings, prefix-shared DPO against the
    stock DPOTrainer likewise; REDI against one
    micro-batch of twice the size (its loss is a mean over pairs); Q-Tuning at keep ratios 1.0 against the
    stock SFTTrainer with the same accumulation.
    """
    if row.id == "prefix_grouper":
        settings = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, num_iterations=2)
        logs = []
        for config_cls, trainer_cls in (
            (GRPOConfig, GRPOTrainer),
            (PrefixGrouperGRPOConfig, PrefixGrouperGRPOTrainer),
        ):
            trainer = _build_grpo(trainer_cls)(config_cls, tmp_path, row.standard(8), **settings)
            trainer.train()
            logs.append(trainer.state.log_history[0])
        stock, grouped = logs
        assert stock["reward_std"] > 0
    elif row.id == "prefix_sharing_dpo":
        data = row.standard(8)
        settings = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2)
        shared = row.build(row.config_cls, tmp_path, data, prefix_sharing_min_prompt_ratio=0.0, **settings)
        dpo = _build_simple(DPOTrainer)(DPOConfig, tmp_path, data, **settings)
        for trainer in (shared, dpo):
            trainer.train()
        grouped, stock = shared.state.log_history[0], dpo.state.log_history[0]
        assert grouped["prefix_sharing/packed_forwards"] == 1.0
    elif row.id == "redi":
        data = row.standard(8)
        accumulated = row.build(
            row.config_cls, tmp_path, data, per_device_train_batch_size=2, gradient_accumulation_steps=2
        )
        single = row.build(
            row.config_cls, tmp_path, data, per_device_train_batch_size=4, gradient_accumulation_steps=1
        )
        for trainer in (accumulated, single):
            trainer.train()
        grouped, stock = accumulated.state.log_history[0], single.state.log_history[0]
    else:
        data = row.standard(8)
        settings = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2)
        qtuning = row.build(row.config_cls, tmp_path, data, sample_keep_ratio=1.0, token_keep_ratio=1.0, **settings)
        sft = _build_simple(SFTTrainer)(SFTConfig, tmp_path, data, **settings)
        for trainer in (qtuning, sft):
            trainer.train()
        grouped, stock = qtuning.state.log_history[0], sft.state.log_history[0]
    for key in ("loss", "grad_norm"):
        assert grouped[key] == pytest.approx(stock[key], rel=1e-4, abs=1e-6), key
