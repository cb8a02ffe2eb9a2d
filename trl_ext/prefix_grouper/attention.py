"""Attention over the packed Prefix Grouper row, in fused kernels, without computing sibling pairs.

:func:`split_attention` runs, on a packed row (see :mod:`trl_ext.prefix_grouper.layout`),

1. the prefix self-attention once: causal SDPA over the prefix area;
2. every block's queries against ``[prefix K/V; own K/V]``, in one of two exact ways:

   - ``"merged"`` (the CPU default): one fused-kernel call of all blocks' queries against the shared prefix keys
     (no mask, grouped-query heads native, the prefix K/V never copied) and one causal fused-kernel call per block
     against its own keys (blocks as batch entries), merged through their log-sum-exp. The backward calls each
     part's backward kernel with the merged output and log-sum-exp, which gives the exact gradient of the joint
     softmax.
   - ``"lower_right"`` (the default on CUDA and other devices): public SDPA per block over the concatenated
     ``[prefix; block]`` keys with a lower-right aligned causal bias, which CUDA's flash and memory-efficient kernels
     apply inside the kernel.

No score tensor is materialised: activation memory grows with tokens x width, as with stock ``sdpa``. Work per
group is ``P^2/2 + G*R*(P + R/2)`` query-key pairs instead of the stock ``G*(P+R)^2/2``; no (query, key) pair of
two sibling completions is ever formed. With attention dropout on, :func:`materialized_split_attention` (explicit
score matrices) is used instead.

It is plugged into transformers through the attention-function registry: :func:`install_grouped_attention`
registers ``"prefix_grouper_sdpa"`` and ``"prefix_grouper_eager"`` (on first use, not at import) and switches the
model to one of them. These run the model's original implementation (``sdpa`` or the model's ``eager``) for every
ordinary forward, generation included, and the split attention only when the forward carries a
:class:`GroupedAttentionLayout` in the ``prefix_grouper_layout`` keyword, which transformers forwards to the
attention function of every layer.

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
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.utils import logging

from .layout import PackedGroups

logger = logging.get_logger(__name__)

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
        kernel (`str`): how block queries attend to ``[prefix; own block]``: ``"merged"`` (two CPU fused-kernel calls
            merged through their log-sum-exp), ``"lower_right"`` (public SDPA with a lower-right causal bias, the
            path for CUDA and other devices), or ``"auto"`` (``"merged"`` on CPU, ``"lower_right"`` elsewhere).
    """

    prefix_width: int
    block_width: int
    num_blocks: int
    prefix_key_padding: torch.Tensor | None = None
    max_position: int = 0
    calls: int = 0
    kernel: str = "auto"

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

    Every part runs in a fused attention kernel; no score matrix is materialised (see the module docstring for the
    kernels used on each device). With attention ``dropout > 0`` it falls back to
    :func:`materialized_split_attention`, which forms the scores explicitly.

    Args:
        query (`torch.Tensor` of shape `(N, H, L, D)`): ``L = prefix_width + num_blocks * block_width``.
        key, value (`torch.Tensor` of shape `(N, H_kv, L, D)`): ``H`` must be a multiple of ``H_kv`` (GQA).
        layout ([`GroupedAttentionLayout`]): the row strides.
        scaling (`float`, *optional*): score scale, defaults to ``D ** -0.5``.
        dropout (`float`): dropout on the attention probabilities (pass 0 outside training).

    Returns:
        `torch.Tensor` of shape `(N, L, H, D)`, the layout transformers' attention functions return.
    """
    _check_shapes(query, layout)
    device = query.device.type
    if torch.is_autocast_enabled(device):
        # What SDPA does under autocast: run the kernels in the autocast dtype (rotary embeddings may have left
        # the queries and keys in fp32 while the values are already in bf16)
        dtype = torch.get_autocast_dtype(device)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if dropout:
        _warn_dropout_once()
        return materialized_split_attention(query, key, value, layout, scaling=scaling, dropout=dropout)
    batch, heads, seq_len, dim = query.shape
    rep = heads // key.size(1)
    width, blocks = layout.prefix_width, layout.num_blocks
    scaling = dim**-0.5 if scaling is None else scaling
    output = query.new_empty(batch, seq_len, heads, dim)
    if width:
        # Prefix area: right-padded, so plain causal attention is exact for its real tokens
        prefix_out = F.scaled_dot_product_attention(
            query[:, :, :width],
            repeat_kv(key[:, :, :width], rep),
            repeat_kv(value[:, :, :width], rep),
            is_causal=True,
            scale=scaling,
        )
        output[:, :width] = prefix_out.transpose(1, 2)
    if blocks:
        tail = slice(width, None)
        kernel = (
            layout.kernel if layout.kernel != "auto" else ("merged" if query.device.type == "cpu" else "lower_right")
        )
        if kernel == "merged":
            prefix_mask = None
            if layout.prefix_key_padding is not None:
                prefix_mask = torch.zeros(layout.prefix_key_padding.shape, dtype=query.dtype, device=query.device)
                prefix_mask = prefix_mask.masked_fill(layout.prefix_key_padding, float("-inf"))[:, None, None, :]
            out = _PrefixAndBlockAttention.apply(
                query[:, :, tail], key[:, :, :width], value[:, :, :width], key[:, :, tail], value[:, :, tail],
                prefix_mask, blocks, scaling,
            )  # fmt: skip
        elif kernel == "lower_right":
            out = _lower_right_block_attention(query, key, value, layout, scaling)
        else:
            raise ValueError(f"kernel={kernel!r} is not one of 'auto', 'merged', 'lower_right'.")
        output[:, tail] = out.transpose(1, 2)
    return output


def _check_shapes(query: torch.Tensor, layout: GroupedAttentionLayout) -> None:
    width, block, blocks = layout.prefix_width, layout.block_width, layout.num_blocks
    if query.size(2) != width + blocks * block:
        raise ValueError(
            f"Packed rows have {query.size(2)} positions but the layout describes {width} + {blocks} * {block}; "
            "build the layout from the same PackedGroups as the input ids."
        )


def _to_blocks(x: torch.Tensor, blocks: int) -> torch.Tensor:
    """``(N, h, G*W, ...)`` -> ``(N*G, h, W, ...)``: one batch entry per block."""
    return x.unflatten(2, (blocks, -1)).transpose(1, 2).flatten(0, 1)


def _from_blocks(x: torch.Tensor, blocks: int) -> torch.Tensor:
    """Inverse of :func:`_to_blocks`."""
    return x.unflatten(0, (-1, blocks)).transpose(1, 2).flatten(2, 3)


_cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_cpu_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _PrefixAndBlockAttention(torch.autograd.Function):
    """Block queries over ``[prefix; own block]`` as two fused-kernel calls merged through their log-sum-exp.

    Part A: every block query against the shared prefix keys (no mask, GQA native, prefix K/V never copied).
    Part B: each block against its own keys, causal (blocks are batch entries). The merged output is
    ``o = o_A * exp(lse_A - lse) + o_B * exp(lse_B - lse)`` with ``lse = logaddexp(lse_A, lse_B)``. Backward calls
    each part's backward kernel with the *merged* output and log-sum-exp, which is exactly the gradient of the joint
    softmax restricted to that part's keys; the query gradients of the two parts add up.
    """

    @staticmethod
    def forward(ctx, q, k_prefix, v_prefix, k_blocks, v_blocks, prefix_mask, blocks, scale):
        lse_b_parts = _cpu_flash(
            _to_blocks(q, blocks), _to_blocks(k_blocks, blocks), _to_blocks(v_blocks, blocks), 0.0, True, scale=scale
        )
        out_b, lse_b = _from_blocks(lse_b_parts[0], blocks), _from_blocks(lse_b_parts[1][..., None], blocks)[..., 0]
        mask = None
        if k_prefix.size(2):
            if prefix_mask is not None:
                mask = prefix_mask.expand(q.size(0), q.size(1), q.size(2), k_prefix.size(2))
            out_a, lse_a = _cpu_flash(q, k_prefix, v_prefix, 0.0, False, attn_mask=mask, scale=scale)
            if prefix_mask is not None:
                # A row whose prompt is one token long has an empty prefix: the kernel reports lse 0 there
                empty = torch.isinf(prefix_mask).all(-1)[:, :, :1].expand_as(lse_a)
                lse_a = lse_a.masked_fill(empty, float("-inf"))
            lse = torch.logaddexp(lse_a, lse_b)
            acc = torch.promote_types(q.dtype, torch.float32)  # merge in at least fp32
            out = out_a.to(acc) * (lse_a - lse).exp_()[..., None] + out_b.to(acc) * (lse_b - lse).exp_()[..., None]
            out = out.to(q.dtype)
        else:
            out, lse = out_b, lse_b
        ctx.save_for_backward(q, k_prefix, v_prefix, k_blocks, v_blocks, mask, out, lse)
        ctx.blocks, ctx.scale = blocks, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k_prefix, v_prefix, k_blocks, v_blocks, mask, out, lse = ctx.saved_tensors
        blocks, scale = ctx.blocks, ctx.scale
        grad_out = grad_out.contiguous()
        grads_b = _cpu_flash_backward(
            _to_blocks(grad_out, blocks), _to_blocks(q, blocks), _to_blocks(k_blocks, blocks),
            _to_blocks(v_blocks, blocks), _to_blocks(out, blocks), _to_blocks(lse[..., None], blocks)[..., 0],
            0.0, True, scale=scale,
        )  # fmt: skip
        grad_q = _from_blocks(grads_b[0], blocks)
        grad_k_prefix = grad_v_prefix = None
        if k_prefix.size(2):
            grad_q_a, grad_k_prefix, grad_v_prefix = _cpu_flash_backward(
                grad_out, q, k_prefix, v_prefix, out, lse, 0.0, False, attn_mask=mask, scale=scale
            )
            grad_q = grad_q + grad_q_a
        grad_k_blocks, grad_v_blocks = _from_blocks(grads_b[1], blocks), _from_blocks(grads_b[2], blocks)
        return grad_q, grad_k_prefix, grad_v_prefix, grad_k_blocks, grad_v_blocks, None, None, None


def _lower_right_block_attention(query, key, value, layout: GroupedAttentionLayout, scaling: float) -> torch.Tensor:
    """Block queries over ``[prefix; own block]`` through public SDPA with a lower-right causal bias.

    One SDPA call per packed row, each block a batch entry whose keys are the row's real prefix followed by the
    block (the prefix K/V are copied once per block). On CUDA, SDPA runs the lower-right causal bias inside its
    flash or memory-efficient kernel; elsewhere it builds a ``(W, prefix + W)`` boolean mask shared by every block.
    """
    width, blocks = layout.prefix_width, layout.num_blocks
    rep = query.size(1) // key.size(1)
    lengths = [width] * query.size(0)
    if layout.prefix_key_padding is not None:
        lengths = (~layout.prefix_key_padding).sum(-1).tolist()
    outputs = []
    for n, length in enumerate(lengths):
        q = _to_blocks(query[n : n + 1, :, width:], blocks)
        k = _to_blocks(key[n : n + 1, :, width:], blocks)
        v = _to_blocks(value[n : n + 1, :, width:], blocks)
        if length:
            k = torch.cat([key[n : n + 1, :, :length].expand(blocks, -1, -1, -1), k], dim=2)
            v = torch.cat([value[n : n + 1, :, :length].expand(blocks, -1, -1, -1), v], dim=2)
        bias = causal_lower_right(q.size(2), k.size(2))
        out = F.scaled_dot_product_attention(q, repeat_kv(k, rep), repeat_kv(v, rep), attn_mask=bias, scale=scaling)
        outputs.append(_from_blocks(out, blocks))
    return torch.cat(outputs)


_dropout_warned = False


def _warn_dropout_once() -> None:
    global _dropout_warned
    if not _dropout_warned:
        _dropout_warned = True
        logger.warning(
            "Prefix grouping with attention dropout > 0 runs a slower attention that materialises the scores. "
            "Set `disable_dropout=True` in the GRPO config (or attention_dropout=0.0) to use the fused kernels."
        )


def materialized_split_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: GroupedAttentionLayout,
    scaling: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """The split attention with explicit score matrices: the path for attention dropout, and a test reference.

    Same arguments and result as :func:`split_attention`. Scores against the shared prefix keys are formed for all
    blocks' queries at once (``(G*W) x prefix``), plus one ``W x W`` causal square per block, joined in one softmax.
    Memory grows with queries x keys, so :func:`split_attention` uses it only when dropout is on.
    """
    _check_shapes(query, layout)
    batch, heads, seq_len, dim = query.shape
    kv_heads = key.size(1)
    rep = heads // kv_heads
    width, block, blocks = layout.prefix_width, layout.block_width, layout.num_blocks
    scaling = dim**-0.5 if scaling is None else scaling
    output = query.new_empty(batch, seq_len, heads, dim)

    k_prefix, v_prefix = key[:, :, :width], value[:, :, :width]
    if width:
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


def register_grouped_attention() -> None:
    """Register the grouped attention functions with transformers (idempotent; done by the installer)."""
    for base, name in GROUPED_IMPLEMENTATIONS.items():
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _grouped_forward(base))
        if name not in AttentionMaskInterface._global_mapping:
            # Ordinary forwards (generation) build the base implementation's padding/causal mask
            AttentionMaskInterface.register(name, sdpa_mask if base == "sdpa" else eager_mask)


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
    register_grouped_attention()
    base_model.set_attn_implementation(name)
    if base_model.config._attn_implementation != name:
        raise fail("its attention does not go through transformers' AttentionInterface")
    return name
