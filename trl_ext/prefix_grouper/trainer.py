"""A drop-in [`trl.GRPOTrainer`] that encodes each prompt once per group of completions."""

from __future__ import annotations

import torch
from trl import GRPOTrainer
from trl.extras.profiling import profiling_decorator

from peft_ext._quantized import keep_4bit_training_layout

from .._compat import grpo_tokenizer, stock_grpo_logps
from .._peft import refuse_prompt_learning
from .attention import (
    FALLBACK_HINT,
    LAYOUT_KWARG,
    GroupedAttentionLayout,
    check_grouped_calls,
    install_grouped_attention,
)
from .layout import chunk_groups, find_groups, pack_groups, split_groups, ungroup
from .selfcheck import (
    POSITION_CONVENTIONS,
    check_sliding_window,
    check_training_determinism,
    compute_dtype,
    output_vocab_size,
    self_check,
    weights_materialised,
)


class PrefixGrouperGRPOTrainer(GRPOTrainer):
    """[`~trl.GRPOTrainer`] whose per-token log-probs come from the shared-prefix forward of Prefix Grouper.

    Only `_get_per_token_logps_and_entropies` changes, so the policy, old and reference log-probs of every loss
    type are computed on packed rows ``[prefix; block_1; ...; block_G]`` (one per group of completions sharing a
    prompt) and mapped back to TRL's ``(batch, completion_len)`` layout. In fp32 the log-probs, entropies, loss and
    gradients match the stock trainer to rounding. Groups are found by identical prompt ids, so they may be split
    across processes or accumulation steps. TRL's fused LM head scores the packed rows, so full-vocabulary logits are
    never materialised.

    Args:
        Same as [`~trl.GRPOTrainer`]; `args` may be a [`PrefixGrouperGRPOConfig`] or a plain [`~trl.GRPOConfig`].
        The model must be a text-only decoder using `attn_implementation="sdpa"` or `"eager"`, without an MoE
        load-balancing loss (`router_aux_loss_coef=0`). When it is built, the trainer scores a tiny synthetic batch
        with the policy and the reference model both the stock and the grouped way (see
        :mod:`~trl_ext.prefix_grouper.selfcheck`) and raises a `ValueError` naming the model type, the measured
        difference and the stock-trainer fallback if they differ. With weights not materialised yet (DeepSpeed
        ZeRO-3), the check runs at the first log-prob computation instead, before any optimizer step.

    Example:
        ```py
        >>> from trl_ext import PrefixGrouperGRPOConfig, PrefixGrouperGRPOTrainer
        >>> from peft_trl_testbed import arithmetic_reward, make_arithmetic_dataset, toy_args, toy_model_path
        >>> args = toy_args(PrefixGrouperGRPOConfig, "out", max_steps=1, per_device_train_batch_size=4,
        ...                 num_generations=4, max_completion_length=8)
        >>> trainer = PrefixGrouperGRPOTrainer(model=toy_model_path(arch="llama"), reward_funcs=arithmetic_reward,
        ...                                    args=args, train_dataset=make_arithmetic_dataset(8))
        >>> trainer.train()
        ```
    """

    _tag_names = ["trl", "grpo", "prefix-grouper", "peft-trl-ext"]

    def __init__(self, *args, **kwargs):
        if getattr(kwargs.get("args", args[2] if len(args) > 2 else None), "prefix_grouper", True):
            refuse_prompt_learning(
                kwargs.get("model", args[0] if args else None),
                kwargs.get("peft_config"),
                "PrefixGrouperGRPOTrainer",
                "they add virtual tokens to every row or to the attention cache, which the packed shared-prefix "
                f"rows do not hold; {FALLBACK_HINT}",
            )
        super().__init__(*args, **kwargs)
        keep_4bit_training_layout(self.model)  # evaluations and checks must not change what trains
        self.prefix_grouper = getattr(self.args, "prefix_grouper", True)
        self.prefix_grouper_max_completions = getattr(self.args, "prefix_grouper_max_completions", None)
        if self.prefix_grouper:
            if self.aux_loss_enabled:
                model_type = self.accelerator.unwrap_model(self.model).config.model_type
                raise ValueError(
                    f"Prefix grouping cannot run model_type={model_type!r} with router_aux_loss_coef="
                    f"{self.router_aux_loss_coef}: the MoE load-balancing loss is not reproduced (the prompt is routed "
                    f"once, not once per completion). Set router_aux_loss_coef=0.0 in the config, or {FALLBACK_HINT}."
                )
            models = [model for model in (self.model, self.ref_model) if model is not None]
            for model in models:
                unwrapped = self.accelerator.unwrap_model(model)
                install_grouped_attention(unwrapped)
            # Position convention learned by the self-check (count the prompt's left padding or not)
            self._prefix_grouper_count_padding: bool | None = None
            self._prefix_grouper_unchecked = models
            if all(weights_materialised(self.accelerator.unwrap_model(model)) for model in models):
                self._prefix_grouper_self_check()

    def _prefix_grouper_self_check(self) -> None:
        """Check the grouped log-probs of the policy and reference model against their stock forward (see
        :func:`~trl_ext.prefix_grouper.selfcheck.self_check`); the policy decides the position convention."""
        models, self._prefix_grouper_unchecked = self._prefix_grouper_unchecked, []
        mixed = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(self.accelerator.mixed_precision))
        for model in models:
            unwrapped = self.accelerator.unwrap_model(model)
            dtype = compute_dtype(unwrapped, mixed)
            conventions = None
            if self._prefix_grouper_count_padding is not None:
                conventions = [k for k, v in POSITION_CONVENTIONS.items() if v == self._prefix_grouper_count_padding]
            result = self_check(self._self_check_scores, model, output_vocab_size(unwrapped), dtype, conventions)
            self._prefix_grouper_count_padding = POSITION_CONVENTIONS[result.position_convention]
            check_sliding_window(unwrapped, self.args, result.sliding_windows)
            if unwrapped is self.accelerator.unwrap_model(self.model):  # the policy is the model that trains
                check_training_determinism(unwrapped, output_vocab_size(unwrapped))

    def _self_check_scores(self, model, input_ids, attention_mask, logits_to_keep, batch_size, count_padding):
        if count_padding is None:
            return stock_grpo_logps(self, model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size)
        return self._grouped_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, batch_size, False, count_padding
        )[0]

    # The one GRPOTrainer hook this trainer overrides (trl_ext._compat.GRPO_LOGPS_HOOK pins its name and signature)
    @profiling_decorator
    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal_inputs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if not self.prefix_grouper:
            return super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size=batch_size,
                compute_entropy=compute_entropy,
                compute_aux_loss=compute_aux_loss,
                **multimodal_inputs,
            )
        given = sorted(name for name, value in multimodal_inputs.items() if value is not None)
        if given:
            raise ValueError(f"Prefix grouping supports text-only inputs, got {given}. Instead, {FALLBACK_HINT}.")
        if compute_aux_loss:
            raise ValueError(
                "Prefix grouping does not reproduce the MoE load-balancing loss (the prompt is routed once, not once "
                f"per completion). Set router_aux_loss_coef=0.0, or {FALLBACK_HINT}."
            )

        if self._prefix_grouper_unchecked:  # weights were not materialised at construction (ZeRO-3)
            self._prefix_grouper_self_check()
        return self._grouped_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            batch_size,
            compute_entropy,
            self._prefix_grouper_count_padding,
        )

    def _grouped_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, count_padding
    ):
        prompt_ids, completion_ids = input_ids[:, :-logits_to_keep], input_ids[:, -logits_to_keep:]
        prompt_mask, completion_mask = attention_mask[:, :-logits_to_keep], attention_mask[:, -logits_to_keep:]
        max_rows = batch_size or input_ids.size(0)
        group_size = min(self.prefix_grouper_max_completions or max_rows, max_rows)
        groups = split_groups(find_groups(prompt_ids, prompt_mask), group_size)
        pad_token_id = grpo_tokenizer(self).pad_token_id or 0

        logps, entropies = [], []
        for chunk in chunk_groups(groups, max_rows):
            # The stock forward numbers positions up to the padded row's last column; a padding cell carries that
            # position so that length-dependent RoPE (dynamic, longrope) picks the stock frequencies
            packed = pack_groups(
                prompt_ids,
                prompt_mask,
                completion_ids,
                completion_mask,
                chunk,
                pad_token_id,
                count_padding=count_padding,
                max_position=input_ids.size(1) - 1 if count_padding else None,
            )
            layout = GroupedAttentionLayout.from_packed(packed)
            with self.accelerator.autocast():
                outputs = model(
                    input_ids=packed.input_ids,
                    # A 4D mask passes through transformers' mask creation untouched; the split attention reads the
                    # layout instead. Integer ids make any attention that did not get the layout fail loudly.
                    attention_mask=packed.segment_ids[:, None, None, :],
                    position_ids=packed.position_ids,
                    shift_labels=packed.shift_labels,
                    fused_lm_head=True,
                    **{LAYOUT_KWARG: layout},
                )
            check_grouped_calls(layout, self.accelerator.unwrap_model(model))
            logps.append(ungroup(outputs.log_probs, packed))
            if compute_entropy:
                entropies.append(ungroup(outputs.entropy, packed))

        # Every stock position is filled by exactly one chunk and is 0 in the others, so the sum is exact
        logps = torch.stack(logps).sum(0)
        entropies = torch.stack(entropies).sum(0) if compute_entropy else None
        return logps, entropies, None
