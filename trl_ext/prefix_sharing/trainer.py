"""A drop-in [`trl.DPOTrainer`] that encodes each prompt once for its chosen and rejected completions."""

from __future__ import annotations

import contextlib
import functools

import torch
from transformers.utils import logging
from trl import DPOTrainer

from peft_ext._quantized import keep_4bit_training_layout

from .._compat import dpo_vision_dataset
from .._peft import refuse_prompt_learning
from ..prefix_grouper.attention import FALLBACK_HINT, install_grouped_attention
from ..prefix_grouper.selfcheck import (
    check_sliding_window,
    check_training_determinism,
    compute_dtype,
    output_vocab_size,
    self_check,
    weights_materialised,
)
from .config import DEFAULT_MIN_PROMPT_RATIO
from .forward import SharingRule, install_prefix_sharing, score_stock_rows

logger = logging.get_logger(__name__)

SHARING_FALLBACK = "set `prefix_sharing=False` in the config, which runs the stock trainer"
# DPO rows are right-padded: positions count from each row's first token, the self-check's "mask" convention
POSITION_CONVENTION = ["mask"]


@contextlib.contextmanager
def _sharing_refusals():
    """Word the refusals of the Prefix Grouper checks for the preference trainers (their fallback differs)."""
    try:
        yield
    except ValueError as error:
        message = str(error)
        if not message.startswith("Prefix grouping cannot run"):
            raise
        message = message.replace("Prefix grouping", "Prefix sharing", 1).replace(FALLBACK_HINT, SHARING_FALLBACK)
        raise ValueError(message) from error


def _argument(args: tuple, kwargs: dict, name: str, position: int):
    return kwargs.get(name, args[position] if len(args) > position else None)


class PrefixSharingMixin:
    """Shared-prefix policy and reference forwards for a [`~trl.DPOTrainer`] subclass (put it first in the bases).

    After the parent is built, the policy (and the reference model, when there is one) get the grouped attention and
    the shared-prefix forward of :mod:`trl_ext.prefix_sharing.forward`, and each model passes the construction-time
    self-check of Prefix Grouper: a tiny batch of two prompts of different lengths with completions of different
    lengths, scored the stock way and the packed way with the model's own weights and compute dtype. Models and
    options the packed forward cannot reproduce are refused there, naming the stock fallback. Reference log-probs
    precomputed while the parent is built (``precompute_ref_log_probs``) already take the shared path.
    """

    def __init__(self, *args, **kwargs):
        config = _argument(args, kwargs, "args", 2)
        if getattr(config, "prefix_sharing", True) is True:
            refuse_prompt_learning(
                _argument(args, kwargs, "model", 0),
                kwargs.get("peft_config"),
                type(self).__name__,
                "they add virtual tokens to every row, which the packed shared-prefix rows do not hold; "
                + SHARING_FALLBACK,
            )
            check_pair_prompts(_argument(args, kwargs, "train_dataset", 4), "train_dataset")
            check_pair_prompts(_argument(args, kwargs, "eval_dataset", 5), "eval_dataset")
        self._prefix_sharing_rule: SharingRule | None = None
        self._prefix_sharing_ready = False
        super().__init__(*args, **kwargs)
        self._ensure_prefix_sharing()

    def _ensure_prefix_sharing(self) -> None:
        """Install and self-check the shared-prefix forward once (before the first forward that may use it)."""
        if self._prefix_sharing_ready:
            return
        self._prefix_sharing_ready = True
        keep_4bit_training_layout(self.model)  # evaluations and checks must not change what trains
        requested = getattr(self.args, "prefix_sharing", True)
        if requested is False:
            return
        ratio = getattr(self.args, "prefix_sharing_min_prompt_ratio", DEFAULT_MIN_PROMPT_RATIO)
        rule = SharingRule(min_prompt_ratio=ratio)
        try:
            with _sharing_refusals():
                self._install_prefix_sharing(rule)
        except ValueError as error:
            if requested is True:
                raise
            # Automatic: the stock forward is exact, only slower. Anything installed stays on the stock path.
            rule.force = "stock"
            logger.warning(f"{type(self).__name__} runs the stock forward: {error}")
            return
        rule.calls.update(shared=0, stock=0)  # count training and evaluation forwards only
        self._prefix_sharing_rule = rule

    def _install_prefix_sharing(self, rule: SharingRule) -> None:
        self._refuse_unsupported_options()
        models = [self.accelerator.unwrap_model(m) for m in (self.model, self.ref_model) if m is not None]
        for model in models:
            install_grouped_attention(model)
            install_prefix_sharing(model, rule)
        mixed = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(self.accelerator.mixed_precision))
        score = functools.partial(_score, rule)
        for model in models:
            dtype = compute_dtype(model, mixed)
            result = self_check(score, model, output_vocab_size(model), dtype, POSITION_CONVENTION)
            check_sliding_window(model, self.args, result.sliding_windows)
        # The policy trains in training mode (also as the reference, with PEFT); a given reference runs in eval mode
        check_training_determinism(models[0], output_vocab_size(models[0]))

    def _refuse_unsupported_options(self) -> None:
        name = type(self).__name__
        refuse_prompt_learning(
            self.accelerator.unwrap_model(self.model),
            None,
            name,
            f"they add virtual tokens to every row, which the packed shared-prefix rows do not hold; {SHARING_FALLBACK}",
        )
        if self.aux_loss_enabled:
            raise ValueError(
                f"Prefix sharing cannot run {name} with router_aux_loss_coef={self.router_aux_loss_coef}: the MoE "
                "load-balancing loss would route each prompt once instead of once per completion. Set "
                f"router_aux_loss_coef=0.0, or {SHARING_FALLBACK}."
            )
        if dpo_vision_dataset(self):
            raise ValueError(
                f"Prefix sharing supports text-only preference data, got images. Instead, {SHARING_FALLBACK}."
            )
        if self.args.use_liger_kernel:
            raise ValueError(
                "Prefix sharing cannot run with use_liger_kernel=True: Liger's kernels are applied after the "
                f"construction-time self-check, so the packed forward would not be checked. Instead, {SHARING_FALLBACK}."
            )
        models = [self.accelerator.unwrap_model(m) for m in (self.model, self.ref_model) if m is not None]
        if not all(weights_materialised(model) for model in models):
            raise ValueError(
                "Prefix sharing checks the packed forward against the stock one on the model's weights when the trainer "
                "is built, and they are not materialised (DeepSpeed ZeRO-3 partitions them, or they are on the meta "
                f"device). Use ZeRO-1/2 or DDP, or {SHARING_FALLBACK}."
            )

    def compute_ref_log_probs(self, model, inputs):
        # Precomputed reference log-probs are computed while the parent is built, before __init__ returns here
        self._ensure_prefix_sharing()
        return super().compute_ref_log_probs(model, inputs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        rule = self._prefix_sharing_rule
        if rule is not None and sum(rule.calls.values()):
            key = "prefix_sharing/packed_forwards" if self.model.training else "eval_prefix_sharing/packed_forwards"
            logs[key] = rule.calls["shared"] / sum(rule.calls.values())
            rule.calls.update(shared=0, stock=0)
        super().log(logs, start_time)


def _score(rule, model, input_ids, attention_mask, logits_to_keep, batch_size, count_padding):
    force = "stock" if count_padding is None else "shared"
    return score_stock_rows(model, rule, force, input_ids, attention_mask, logits_to_keep, batch_size)


def check_pair_prompts(dataset, name: str) -> None:
    """Refuse a conversational dataset with implicit prompts whose chosen and rejected conversations differ before
    their last message: TRL would take only their common start as the prompt and train the rest of each prompt as
    part of the completion.

    Datasets with a ``prompt`` column, or already tokenized, share the prompt by construction; string datasets with
    implicit prompts carry no turn boundary to check.

    Raises:
        ValueError: naming the first such row.
    """
    datasets = dataset.values() if isinstance(dataset, dict) else [dataset]
    for data in datasets:
        columns = getattr(data, "column_names", None) or []
        if "prompt" in columns or "chosen" not in columns or "rejected" not in columns or not hasattr(data, "__len__"):
            continue
        for index, row in enumerate(data.select_columns(["chosen", "rejected"])):
            chosen, rejected = row["chosen"], row["rejected"]
            if not isinstance(chosen, list) or not isinstance(rejected, list):
                break  # standard (string) data
            if chosen[:-1] != rejected[:-1]:
                raise ValueError(
                    f"{name} row {index}: the chosen and rejected conversations differ before their last message, so "
                    "they do not share a prompt. Give the row one prompt (a `prompt` column, or identical messages "
                    "before the last one), or drop it."
                )


class PrefixSharingDPOTrainer(PrefixSharingMixin, DPOTrainer):
    """[`~trl.DPOTrainer`] whose policy and reference forwards encode each prompt once for both completions.

    A batch of pairs is scored as one packed row per distinct prompt, ``[prompt; chosen; rejected]``, with the split
    attention of Prefix Grouper (a completion never attends to its sibling), and mapped back to the stock per-token
    outputs, so DPO's own code computes the loss (every ``loss_type``), the reference log-ratios and the metrics. In
    fp32 a training step matches [`~trl.DPOTrainer`]'s to rounding. Batches whose prompts are short next to their
    completions run the stock forward (see ``prefix_sharing_min_prompt_ratio``); the share of packed forwards is logged
    as ``prefix_sharing/packed_forwards``.

    Args:
        Same as [`~trl.DPOTrainer`]; `args` may be a [`PrefixSharingDPOConfig`] or a plain [`~trl.DPOConfig`]. The
        model must be a text-only decoder using `attn_implementation="sdpa"` or `"eager"`, without an MoE
        load-balancing loss. When the trainer is built, the policy and the reference model are checked against their
        stock forward on a tiny batch (see [`PrefixSharingMixin`]); a mismatch raises a `ValueError` naming the model
        type and the fallback `prefix_sharing=False`.

    Example:
        ```py
        >>> from trl_ext import PrefixSharingDPOConfig, PrefixSharingDPOTrainer
        >>> from peft_trl_testbed import make_reasoning_preferences, pretrained_toy_model_path, toy_args
        >>> args = toy_args(PrefixSharingDPOConfig, "dpo-out", max_steps=2)
        >>> trainer = PrefixSharingDPOTrainer(model=pretrained_toy_model_path(), args=args,
        ...                                   train_dataset=make_reasoning_preferences(16))
        >>> trainer.train()
        ```
    """

    _tag_names = ["trl", "dpo", "prefix-sharing", "peft-trl-ext"]
