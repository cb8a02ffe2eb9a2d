"""The shared-prefix forward of a preference batch, installed on the model TRL gave a fused LM head.

:func:`install_prefix_sharing` wraps the model's ``forward``. A call in the form TRL's DPO trainer makes it
(``input_ids``, a right-padded ``attention_mask``, ``labels`` and ``fused_lm_head=True``) is packed one row per
distinct prompt (:mod:`.pairs`), run through the split attention of Prefix Grouper
(:mod:`trl_ext.prefix_grouper.attention`) and returned as the ``FusedCausalLMOutput`` of the stock call: every
per-token field (``log_probs``, ``entropy``, ``mean_logits``, ``is_top1``, ``log_sum_sq_probs``, ``label_mask``)
in the stock ``(rows, length - 1)`` layout, and the same ``loss``. Everything the trainer computes from them (every
``loss_type``, ``ld_alpha``, WPO weights, the reference log-ratios and the logged metrics) is therefore computed by
TRL's own code. Any other call (generation, logits, inputs the packing does not model) runs the wrapped forward
unchanged.

Whether a batch is packed follows :class:`SharingRule`: only when some prompt is shared, and only when the prompt
tokens are at least ``min_prompt_ratio`` times the completion tokens, where the packed forward is measured to be
faster (``benchmarks/prefix_sharing_dpo.py``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from trl.trainer.utils import FusedCausalLMOutput

from ..prefix_grouper.attention import LAYOUT_KWARG, GroupedAttentionLayout, check_grouped_calls
from ..prefix_grouper.layout import IGNORE_INDEX
from .pairs import PackedPairs, is_right_padded, pack_pairs, unpack

PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# Keyword arguments the DPO trainers pass besides the ids, the mask and the labels; anything else runs stock
PASSED_THROUGH = {"use_cache", "return_dict", "output_router_logits", "num_items_in_batch"}


@dataclass
class SharingRule:
    """When a batch is packed, and what was decided so far.

    Attributes:
        min_prompt_ratio (`float`): pack only when the batch's prompt tokens are at least this many times its
            completion tokens (``0`` packs every batch that shares a prompt).
        force (`str` or `None`): ``"stock"`` or ``"shared"`` overrides the rule (the self-check scores both ways).
        calls (`dict[str, int]`): forwards run each way, for logging.
    """

    min_prompt_ratio: float = 0.0
    force: str | None = None
    calls: dict[str, int] = field(default_factory=lambda: {"shared": 0, "stock": 0})

    def packs(self, pairs: PackedPairs) -> bool:
        if self.force is not None:
            return self.force == "shared"
        if not pairs.shared_rows:
            return False
        return pairs.prompt_tokens >= self.min_prompt_ratio * pairs.completion_tokens


def _packable(args, kwargs, labels, fused_lm_head, shift_labels) -> bool:
    if args or not fused_lm_head or labels is None or shift_labels is not None:
        return False
    if set(kwargs) - PASSED_THROUGH - {"input_ids", "attention_mask"}:
        return False  # inputs_embeds, position_ids, multimodal inputs...: the packing does not model them
    input_ids, attention_mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    if not isinstance(input_ids, torch.Tensor) or not isinstance(attention_mask, torch.Tensor):
        return False
    return input_ids.shape == labels.shape and is_right_padded(attention_mask)


def install_prefix_sharing(model, rule: SharingRule) -> None:
    """Wrap the ``forward`` of ``model`` (a transformers causal LM given TRL's fused LM head, or a PEFT model around
    one) with the shared-prefix forward; the model must already use the grouped attention
    (:func:`~trl_ext.prefix_grouper.attention.install_grouped_attention`).

    Installing again on the same model (a second trainer around it) only replaces the rule.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base.forward, "prefix_sharing_rule"):
        base.forward.prefix_sharing_rule = rule
        return
    original = base.forward
    rotary = uses_rotary_positions(base.config)

    @functools.wraps(original)  # generate() validates its kwargs against the wrapped signature
    def forward(*args, fused_lm_head=False, labels=None, shift_labels=None, **kwargs):
        rule = forward.prefix_sharing_rule
        if _packable(args, kwargs, labels, fused_lm_head, shift_labels):
            ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
            pairs = pack_pairs(ids, mask, labels, carry_padded_width=rotary)
            if rule.packs(pairs):
                rule.calls["shared"] += 1
                return _shared_forward(original, base, pairs, kwargs)
            rule.calls["stock"] += 1
        if shift_labels is not None:
            kwargs["shift_labels"] = shift_labels
        return original(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)

    forward.prefix_sharing_rule = rule
    base.forward = forward


def uses_rotary_positions(config) -> bool:
    """Whether the model encodes positions with RoPE (computed for any position id), not with a position table."""
    text = config.get_text_config()
    return any(getattr(text, name, None) is not None for name in ("rope_parameters", "rope_scaling", "rope_theta"))


def _shared_forward(original, base, pairs: PackedPairs, kwargs) -> FusedCausalLMOutput:
    packed = pairs.packed
    layout = GroupedAttentionLayout.from_packed(packed)
    extra = {k: v for k, v in kwargs.items() if k in PASSED_THROUGH - {"num_items_in_batch"}}
    if hasattr(base.config.get_text_config(), "output_router_logits"):
        # The load-balancing loss would count the prompt once per packed row; trainers refuse it when it is used
        extra["output_router_logits"] = False
    outputs = original(
        input_ids=packed.input_ids,
        # A 4D mask passes through transformers' mask creation untouched; the split attention reads the layout
        # instead, and integer ids make any attention that did not get it fail loudly
        attention_mask=packed.segment_ids[:, None, None, :],
        position_ids=packed.position_ids,
        shift_labels=packed.shift_labels,
        fused_lm_head=True,
        **extra,
        **{LAYOUT_KWARG: layout},
    )
    check_grouped_calls(layout, base)
    fields = {
        name: None if getattr(outputs, name) is None else unpack(getattr(outputs, name), pairs)
        for name in PER_TOKEN_FIELDS
    }
    mask = pairs.label_mask
    items = kwargs.get("num_items_in_batch")
    loss = -fields["log_probs"].sum() / (mask.sum().clamp(min=1) if items is None else items)
    return FusedCausalLMOutput(loss=loss, label_mask=mask, **fields)


def score_stock_rows(model, rule: SharingRule, force: str, input_ids, attention_mask, logits_to_keep, batch_size=None):
    """Per-token log-probs of the completions of a left-padded ``[prompt; completion]`` batch (the self-check's
    batch format), scored as DPO scores rows (right-padded, labels on the completion), ``batch_size`` rows per forward,
    with the rule forced to ``force`` (``"stock"`` or ``"shared"``).

    Returns a ``(B, logits_to_keep)`` tensor: completion token ``t`` of row ``b`` at ``[b, t]``.
    """
    prompt_width = input_ids.size(1) - logits_to_keep
    prompt_mask, completion_mask = attention_mask[:, :prompt_width].bool(), attention_mask[:, prompt_width:].bool()
    prompts = [ids[mask] for ids, mask in zip(input_ids[:, :prompt_width], prompt_mask)]
    completions = [ids[mask] for ids, mask in zip(input_ids[:, prompt_width:], completion_mask)]
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = input_ids.new_zeros(input_ids.size(0), width)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for b, (prompt, completion) in enumerate(zip(prompts, completions)):
        end = len(prompt) + len(completion)
        ids[b, :end] = torch.cat([prompt, completion])
        labels[b, len(prompt) : end] = completion
        mask[b, :end] = 1
    step = batch_size or ids.size(0)
    saved, rule.force = rule.force, force
    try:
        logps = torch.cat(
            [
                model(
                    input_ids=ids[i : i + step],
                    attention_mask=mask[i : i + step],
                    labels=labels[i : i + step],
                    use_cache=False,
                    fused_lm_head=True,
                ).log_probs
                for i in range(0, ids.size(0), step)
            ]
        )
    finally:
        rule.force = saved
    out = logps.new_zeros(input_ids.size(0), logits_to_keep)
    for b, (prompt, completion) in enumerate(zip(prompts, completions)):
        out[b, : len(completion)] = logps[b, len(prompt) - 1 : len(prompt) - 1 + len(completion)]
    return out
