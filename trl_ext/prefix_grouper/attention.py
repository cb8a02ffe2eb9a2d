"""Attention over the packed Prefix Grouper row, without computing sibling pairs.

:func:`split_attention` is the fast path. On a packed row (see :mod:`trl_ext.prefix_grouper.layout`) it runs

1. the prefix self-attention once (causal SDPA over the prefix area), then
2. for every block, its queries against ``[prefix K/V; own K/V]``: one score matrix against the shared prefix keys
   (all blocks' queries at once, the prefix K/V are never copied) and one block-diagonal causal matrix per block,
   joined in a single softmax.

Work per group is ``P^2/2 + G*R*(P + R)`` query-key pairs instead of the stock ``G*(P+R)^2/2``; no (query, key) pair
of two sibling completions is ever formed.

It is plugged into transformers through the attention-function registry: :func:`install_grouped_attention` switches
a model to ``"prefix_grouper_sdpa"`` or ``"prefix_grouper_eager"``. These run the model's original implementation
(``sdpa`` or the model's ``eager``) for every ordinary forward, generation included, and the split attention only
when the forward carries a :class:`GroupedAttentionLayout` in the ``prefix_grouper_layout`` keyword, which
transformers forwards to the attention function of every layer.

:func:`dense_reference_mask` is the slow dense equivalent, kept as a test reference only: an additive ``0 / -inf``
4D mask over the whole packed row, which the stock ``sdpa`` and ``eager`` functions accept unchanged. It computes
every masked sibling pair, ``(P + G*R)^2`` work. It is additive on purpose: ``eager`` adds the mask to the scores,
so a boolean 4D mask would be added as 0/1 and silently give wrong results.

Example:
    ```py
    >>> from transformers import AutoModelForCausalLM
    >>> from trl_ext.prefix_grouper.attention import install_grouped_attention
    >>> from trl_ext.toy import toy_model_path
    >>> model = AutoModelForCausalLM.from_pretrained(toy_model_path(arch="llama"), attn_implementation="sdpa")
    >>> install_grouped_attention(model)
    'prefix_grouper_sdpa'
    ```
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .layout import PackedGroups, attention_allowed

LAYOUT_KWARG = "prefix_grouper_layout"
GROUPED_IMPLEMENTATIONS = {"sdpa": "prefix_grouper_sdpa", "eager": "prefix_grouper_eager"}
FALLBACK_HINT = "train with the stock `trl.GRPOTrainer` (or set `prefix_grouper=False`)"


@dataclass
class GroupedAttentionLayout:
    """What every attention layer needs to know about a packed batch; passed as ``prefix_grouper_layout=...``.

    Attributes:
        prefix_width (`int`): width of the prefix area.
        block_width (`int`): width of each completion block slot.
        num_blocks (`int`): block slots per row.
        prefix_key_padding (`torch.BoolTensor` of shape `(N, prefix_width)` or `None`): True on prefix-area
            padding of rows whose prompt is shorter than the widest one; `None` when there is none.
        max_position (`int`): largest position id in the batch (checked against sliding windows).
        calls (`int`): incremented by every attention layer that ran the split attention, so the caller can check
            that the model really routed its attention through it.
    """

    prefix_width: int
    block_width: int
    num_blocks: int
    prefix_key_padding: torch.Tensor | None = None
    max_position: int = 0
    calls: int = 0

    @classmethod
    def from_packed(cls, packed: PackedGroups) -> GroupedAttentionLayout:
        """Build the layout of a [`~layout.PackedGroups`]."""
        padding = None
        if packed.prefix_width and bool((packed.prefix_lengths < packed.prefix_width).any()):
            columns = torch.arange(packed.prefix_width, device=packed.prefix_lengths.device)
            padding = columns[None, :] >= packed.prefix_lengths[:, None]
        return cls(
            prefix_width=packed.prefix_width,
            block_width=packed.block_width,
            num_blocks=packed.num_blocks,
            prefix_key_padding=padding,
            max_position=int(packed.position_ids.max()) if packed.position_ids.numel() else 0,
        )


def split_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: GroupedAttentionLayout,
    scaling: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention over packed rows: prefix self-attention once, then each block over ``[prefix; own block]``.

    Args:
        query (`torch.Tensor` of shape `(N, H, L, D)`): ``L = prefix_width + num_blocks * block_width``.
        key, value (`torch.Tensor` of shape `(N, H_kv, L, D)`): ``H`` must be a multiple of ``H_kv`` (GQA).
        layout ([`GroupedAttentionLayout`]): the row strides.
        scaling (`float`, *optional*): score scale, defaults to ``D ** -0.5``.
        dropout (`float`): dropout on the attention probabilities (pass 0 outside training).

    Returns:
        `torch.Tensor` of shape `(N, L, H, D)`, the layout transformers' attention functions return.
    """
    batch, heads, seq_len, dim = query.shape
    kv_heads = key.size(1)
    rep = heads // kv_heads
    width, block, blocks = layout.prefix_width, layout.block_width, layout.num_blocks
    if seq_len != width + blocks * block:
        raise ValueError(
            f"Packed rows have {seq_len} positions but the layout describes {width} + {blocks} * {block}; "
            "build the layout from the same PackedGroups as the input ids."
        )
    scaling = dim**-0.5 if scaling is None else scaling
    output = query.new_empty(batch, seq_len, heads, dim)

    k_prefix, v_prefix = key[:, :, :width], value[:, :, :width]
    if width:
        # Prefix area: right-padded, so plain causal attention is exact for its real tokens
        prefix_out = F.scaled_dot_product_attention(
            query[:, :, :width],
            repeat_kv(k_prefix, rep),
            repeat_kv(v_prefix, rep),
            is_causal=True,
            scale=scaling,
            dropout_p=dropout,
        )
        output[:, :width] = prefix_out.transpose(1, 2)

    if blocks:
        # Query heads h = kv * rep + r share key head kv (the repeat_kv convention): view them per KV head instead
        # of repeating the keys. Scores against the shared prefix keys, for all blocks' queries at once, and one
        # W x W square per block; the two parts share one softmax, computed by hand so neither is copied.
        q_blocks = (query[:, :, width:] * scaling).reshape(batch, kv_heads, rep, blocks * block, dim)
        k_blocks = key[:, :, width:].reshape(batch, kv_heads, 1, blocks, block, dim)
        v_blocks = value[:, :, width:].reshape(batch, kv_heads, 1, blocks, block, dim)
        to_prefix = q_blocks @ k_prefix[:, :, None].transpose(-1, -2)  # (N, H_kv, rep, G*W, width)
        to_self = q_blocks.view(batch, kv_heads, rep, blocks, block, dim) @ k_blocks.transpose(-1, -2)
        if layout.prefix_key_padding is not None:
            to_prefix.masked_fill_(layout.prefix_key_padding[:, None, None, None, :], float("-inf"))
        future = torch.ones(block, block, dtype=torch.bool, device=query.device).triu(1)
        to_self.masked_fill_(future, float("-inf"))
        # Softmax in at least fp32, like the eager implementations. The shift is a constant of the softmax, so it
        # carries no gradient; every row has its diagonal key, so it is finite.
        compute_dtype = torch.promote_types(query.dtype, torch.float32)
        to_prefix, to_self = to_prefix.to(compute_dtype), to_self.to(compute_dtype)
        shift = to_self.amax(-1).flatten(-2, -1)
        if width:
            shift = torch.maximum(shift, to_prefix.amax(-1))
        shift = shift.detach()[..., None]
        e_prefix = (to_prefix - shift).exp_()
        e_self = (to_self - shift.view(*to_self.shape[:-1], 1)).exp_()
        norm = e_prefix.sum(-1, keepdim=True) + e_self.sum(-1).flatten(-2, -1)[..., None]
        if dropout:
            e_prefix = F.dropout(e_prefix, p=dropout, training=True)
            e_self = F.dropout(e_self, p=dropout, training=True)
        e_prefix, e_self = e_prefix.to(query.dtype), e_self.to(query.dtype)
        out = e_prefix @ v_prefix[:, :, None] + (e_self @ v_blocks).flatten(3, 4)
        out = out / norm.to(query.dtype)
        output[:, width:] = out.reshape(batch, heads, blocks * block, dim).transpose(1, 2)

    return output


def dense_reference_mask(packed: PackedGroups, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive ``(N, 1, L, L)`` mask (0 allowed, -inf hidden) of the packed layout, for reference checks.

    Passing it as ``attention_mask`` (with the packed ``position_ids``) to a model using stock ``sdpa`` or ``eager``
    reproduces the grouped forward densely, computing every masked sibling pair. Tests only.
    """
    allowed = attention_allowed(packed.segment_ids)[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


def _unsupported(module: torch.nn.Module, what: str) -> ValueError:
    model_type = getattr(getattr(module, "config", None), "model_type", type(module).__name__)
    return ValueError(f"Prefix grouping cannot run model_type={model_type!r}: {what}. Instead, {FALLBACK_HINT}.")


def _eager_forward(module: torch.nn.Module) -> Callable:
    # "eager" is not in the registry: each modeling file defines its own `eager_attention_forward`
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise _unsupported(module, f"{type(module).__name__} has no module-level `eager_attention_forward`")
    return fn


def _grouped_forward(base: str) -> Callable:
    def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        layout = kwargs.pop(LAYOUT_KWARG, None)
        if layout is None:
            if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.long:
                raise _unsupported(module, "its attention layers do not receive the keyword arguments of the forward")
            base_fn = sdpa_attention_forward if base == "sdpa" else _eager_forward(module)
            return base_fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        if kwargs.get("softcap") is not None:
            raise _unsupported(module, "attention logit soft-capping is not implemented in the split attention")
        if kwargs.get("s_aux") is not None:
            raise _unsupported(module, "attention sinks are not implemented in the split attention")
        window = kwargs.get("sliding_window")
        if window is not None and layout.max_position >= window:
            raise _unsupported(
                module, f"sliding_window={window} is shorter than the sequences ({layout.max_position})"
            )
        if getattr(module, "is_causal", True) is False:
            raise _unsupported(module, "the attention is not causal")
        layout.calls += 1
        return split_attention(query, key, value, layout, scaling=scaling, dropout=dropout), None

    attention_forward.__name__ = f"prefix_grouper_{base}_attention_forward"
    return attention_forward


for _base, _name in GROUPED_IMPLEMENTATIONS.items():
    AttentionInterface.register(_name, _grouped_forward(_base))
    # Ordinary forwards (generation) build the base implementation's padding/causal mask
    AttentionMaskInterface.register(_name, sdpa_mask if _base == "sdpa" else eager_mask)


def install_grouped_attention(model) -> str:
    """Switch ``model`` (a transformers causal LM, or a PEFT model around one) to the grouped attention.

    The model keeps computing ordinary forwards with its original implementation; only forwards that pass
    ``prefix_grouper_layout=`` take the split path. Calling it again is a no-op.

    Args:
        model: a `PreTrainedModel` or a `peft.PeftModel`.

    Returns:
        `str`: the new ``attn_implementation`` name.

    Raises:
        ValueError: naming the model type and the fallback, when the model cannot be grouped.
    """
    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base_model.config
    model_type = config.model_type
    current = config._attn_implementation
    if current in GROUPED_IMPLEMENTATIONS.values():
        return current

    def fail(why: str) -> ValueError:
        return ValueError(f"Prefix grouping cannot run model_type={model_type!r}: {why}. Instead, {FALLBACK_HINT}.")

    if current not in GROUPED_IMPLEMENTATIONS:
        raise fail(
            f"attn_implementation={current!r} is not supported; load the model with attn_implementation='sdpa' "
            "(or 'eager')"
        )
    if getattr(config, "is_encoder_decoder", False) or config.get_text_config() is not config:
        raise fail("only text-only decoder models are supported")
    layer_types = getattr(config, "layer_types", None) or []
    other_layers = sorted(set(layer_types) - {"full_attention"})
    if other_layers:
        raise fail(f"layer_types {other_layers} mix tokens in ways the shared-prefix layout does not reproduce")
    if getattr(config, "reorder_and_upcast_attn", False):
        raise fail("reorder_and_upcast_attn=True bypasses the attention-function registry")

    name = GROUPED_IMPLEMENTATIONS[current]
    base_model.set_attn_implementation(name)
    if base_model.config._attn_implementation != name:
        raise fail("its attention does not go through transformers' AttentionInterface")
    return name
