"""Attention over the packed Prefix Grouper row, in fused kernels, without computing sibling pairs.

:func:`split_attention` runs, on a packed row (see :mod:`trl_ext.prefix_grouper.layout`),

1. the prefix self-attention once: causal attention over the prefix area;
2. every block's queries against ``[prefix K/V; own K/V]``, in one of two exact ways:

   - ``"merged"`` (the CPU default): fused-kernel calls for the parts (all blocks' queries against the shared prefix
     keys, GQA native and the prefix K/V never copied; each block against its own keys, causal, blocks as batch
     entries), merged through their log-sum-exp. The backward calls each part's backward kernel with the merged
     output and log-sum-exp, which gives the exact gradient of the joint softmax.
   - ``"lower_right"`` (the default on CUDA and other devices): public SDPA per row, each block a batch entry over
     the concatenated ``[prefix; block]`` keys with a lower-right aligned causal bias, which CUDA's flash and
     memory-efficient kernels apply inside the kernel.

Layer features, each exact against the stock forward:

- sliding windows (Mistral, Qwen2 with ``use_sliding_window``, Phi-3, StarCoder2, Gemma 2/3 and GPT-OSS sliding
  layers): a query sees keys fewer than ``sliding_window`` positions back, counted in the stock row (a block token
  ``i`` sits ``prefix_length + i - j`` positions after prefix token ``j``), as transformers' ``sliding_window_overlay``.
  Past the window, self-attention goes in query chunks of ``window`` (a shared ``window x 2 window`` band mask),
  and only the first ``window - 1`` queries of a block see prefix keys, the last ``window - 1`` of them through a
  ``window x window`` band shared by every block: work and memory grow with tokens x window;
- attention sinks (GPT-OSS ``s_aux``): one more term, with a zero value, in every query's log-sum-exp;
- MLA (``v_head_dim != qk_head_dim``: DeepSeek-V2/V3, MiniCPM3, GLM-4-MoE-lite): the fused kernels get zero-padded
  head dims; the output has the value head dim;
- logit soft-capping (Gemma 2, eager): no fused kernel can apply it, so it runs
  :func:`materialized_split_attention`, one block's score matrix at a time.

No score tensor of block queries x prefix keys is materialised: activation memory grows with tokens x width, as with
stock ``sdpa``. Work per group is ``P^2/2 + G*R*(P + R/2)`` query-key pairs instead of the stock ``G*(P+R)^2/2``
(less with a window); no (query, key) pair of two sibling completions is ever formed. With attention dropout on,
:func:`materialized_split_attention` (explicit score matrices, one block at a time) is used instead.

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
    >>> from peft_trl_testbed import toy_model_path
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
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.utils import logging

from .._compat import attn_implementation
from .._compat import cpu_flash_attention as _cpu_flash
from .._compat import cpu_flash_attention_backward as _cpu_flash_backward
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
        prefix_lengths (`list[int]` or `None`): real prefix tokens of each row (``prompt length - 1``); `None` reads
            them from ``prefix_key_padding`` (all ``prefix_width`` when that is `None`). Sliding windows count
            distances from them: block token ``i`` of row ``n`` sits ``prefix_lengths[n] + i - j`` positions after
            prefix token ``j``, as in the stock row.
        max_position (`int`): largest position id in the batch.
        calls (`int`): incremented by every attention layer that ran the split attention, so the caller can check
            that the model really routed its attention through it.
        kernel (`str`): how block queries attend to ``[prefix; own block]``: ``"merged"`` (CPU fused-kernel calls
            merged through their log-sum-exp), ``"lower_right"`` (public SDPA with a lower-right causal bias, the
            path for CUDA and other devices), or ``"auto"`` (``"merged"`` on CPU, ``"lower_right"`` elsewhere).
    """

    prefix_width: int
    block_width: int
    num_blocks: int
    prefix_key_padding: torch.Tensor | None = None
    prefix_lengths: list[int] | None = None
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
            prefix_lengths=packed.prefix_lengths.tolist(),
            max_position=int(packed.position_ids.max()) if packed.position_ids.numel() else 0,
        )

    def row_prefix_lengths(self, rows: int) -> list[int]:
        """Real prefix tokens of each of the ``rows`` packed rows."""
        if self.prefix_lengths is not None:
            if len(self.prefix_lengths) != rows:
                raise ValueError(
                    f"The layout has prefix_lengths for {len(self.prefix_lengths)} rows but the input has {rows}; "
                    "build the layout from the same PackedGroups as the input ids."
                )
            return list(self.prefix_lengths)
        if self.prefix_key_padding is not None:
            return (~self.prefix_key_padding).sum(-1).tolist()
        return [self.prefix_width] * rows


@dataclass(frozen=True)
class _RowPlan:
    """Which prefix keys the block queries of one packed row see: keys ``[lo, hi)`` for the first ``queries`` queries
    of every block, through ``mask`` (None: all of them)."""

    lo: int
    hi: int
    queries: int
    window_cut: bool


def _row_plans(lengths: list[int], block_width: int, window: int | None) -> list[_RowPlan]:
    """Per row, the prefix keys within reach of block queries.

    Block query ``i`` sits ``length + i - j`` positions after prefix key ``j``; the stock sliding-window mask keeps
    distances below ``window``. So when ``length + block_width - 1 >= window`` only queries ``i < window - 1`` see any
    prefix key, and only the last ``window - 1`` of them, through a band mask.
    """
    plans = []
    for length in lengths:
        if window is None or length + block_width - 1 < window:
            plans.append(_RowPlan(0, length, block_width, False))
        else:
            reach = min(window - 1, length)
            plans.append(_RowPlan(length - reach, length, min(block_width, window - 1), True))
    return plans


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _prefix_band(queries: int, keys: int, window: int, device) -> torch.Tensor:
    """Allowed (block query ``i``, prefix key ``t``) pairs of a window-cut row: keys are the last ``keys`` prefix
    tokens, so the distance is ``keys + i - t`` and must stay below ``window``."""
    i = torch.arange(queries, device=device)[:, None]
    t = torch.arange(keys, device=device)[None, :]
    return keys + i - t < window


def _chunk_band(queries: int, keys: int, window: int, device) -> torch.Tensor:
    """Allowed pairs of a query chunk whose keys start ``window - 1`` positions before it: ``a <= b <= a + window - 1``."""
    a = torch.arange(queries, device=device)[:, None]
    b = torch.arange(keys, device=device)[None, :]
    return (b >= a) & (b <= a + window - 1)


def _chunks(length: int, window: int) -> list[tuple[int, int, int]]:
    """Query chunks ``(start, count, size)`` after the first ``window`` positions of a sliding self-attention."""
    full, rest = divmod(length - window, window)
    chunks = [(window, full, window)] if full else []
    if rest:
        chunks.append((window + full * window, 1, rest))
    return chunks


def _chunk_keys(x: torch.Tensor, start: int, count: int, size: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` chunks of keys, each ``size + window - 1`` long and starting ``window - 1`` before its queries, as
    batch entries ``(B * count, h, size + window - 1, D)``; also the gathered sequence indices."""
    span = size + window - 1
    index = start - window + 1 + size * torch.arange(count, device=x.device)[:, None]
    index = (index + torch.arange(span, device=x.device)[None, :]).flatten()
    return x.index_select(2, index).unflatten(2, (count, span)).transpose(1, 2).flatten(0, 1), index


def _chunk_queries(x: torch.Tensor, start: int, count: int, size: int) -> torch.Tensor:
    return x[:, :, start : start + count * size].unflatten(2, (count, size)).transpose(1, 2).flatten(0, 1)


def _unchunk(x: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`_chunk_queries` (without the offset)."""
    return x.unflatten(0, (-1, count)).transpose(1, 2).flatten(2, 3)


def _sliding_forward(q, k, v, window: int | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal self-attention of equal-length sequences, limited to the last ``window`` keys; returns (out, lse).

    Beyond the window, queries go in chunks of ``window``: the first chunk is plain causal, every other chunk sees
    the ``window - 1`` keys before it and itself through one shared ``(window x 2 window)`` band mask, so work and
    memory grow with ``length x window``.
    """
    length = q.size(2)
    if window is None or length <= window:
        return _cpu_flash(q, k, v, 0.0, True, scale=scale)
    out = q.new_empty(*q.shape[:-1], v.size(-1))
    lse = q.new_empty(q.shape[:-1], dtype=torch.promote_types(q.dtype, torch.float32))
    head = slice(0, window)
    o, o_lse = _cpu_flash(q[:, :, head], k[:, :, head], v[:, :, head], 0.0, True, scale=scale)
    out[:, :, head], lse[:, :, head] = o, o_lse
    for start, count, size in _chunks(length, window):
        mask = _additive(_chunk_band(size, size + window - 1, window, q.device), q.dtype)
        kc, _ = _chunk_keys(k, start, count, size, window)
        vc, _ = _chunk_keys(v, start, count, size, window)
        o, o_lse = _cpu_flash(_chunk_queries(q, start, count, size), kc, vc, 0.0, False, attn_mask=mask, scale=scale)
        rows = slice(start, start + count * size)
        out[:, :, rows], lse[:, :, rows] = _unchunk(o, count), _unchunk(o_lse, count)
    return out, lse


def _sliding_backward(grad, q, k, v, out, lse, window: int | None, scale: float):
    """Backward of :func:`_sliding_forward` given the (possibly merged) ``out`` and ``lse`` of its queries."""
    length = q.size(2)
    if window is None or length <= window:
        return _cpu_flash_backward(grad, q, k, v, out, lse, 0.0, True, scale=scale)
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    head = slice(0, window)
    dq, dk, dv = _cpu_flash_backward(
        grad[:, :, head].contiguous(),
        q[:, :, head],
        k[:, :, head],
        v[:, :, head],
        out[:, :, head].contiguous(),
        lse[:, :, head].contiguous(),
        0.0,
        True,
        scale=scale,
    )
    grad_q[:, :, head], grad_k[:, :, head], grad_v[:, :, head] = dq, dk, dv
    for start, count, size in _chunks(length, window):
        mask = _additive(_chunk_band(size, size + window - 1, window, q.device), q.dtype)
        kc, index = _chunk_keys(k, start, count, size, window)
        vc, _ = _chunk_keys(v, start, count, size, window)
        grad_c, q_c, out_c, lse_c = (_chunk_queries(x, start, count, size).contiguous() for x in (grad, q, out, lse))
        dq, dk, dv = _cpu_flash_backward(grad_c, q_c, kc, vc, out_c, lse_c, 0.0, False, attn_mask=mask, scale=scale)
        grad_q[:, :, start : start + count * size] = _unchunk(dq, count)
        grad_k.index_add_(2, index, _unchunk(dk, count))
        grad_v.index_add_(2, index, _unchunk(dv, count))
    return grad_q, grad_k, grad_v


def _queries_a(x: torch.Tensor, n: int, width: int, blocks: int, plan: _RowPlan) -> torch.Tensor:
    """The block queries of row ``n`` that see prefix keys (a view): all of them as one sequence ``(1, h, G*W, ...)``
    when the window does not cut; else the first ``plan.queries`` of every block, blocks as batch entries
    ``(G, h, queries, ...)``, so that one ``(queries x keys)`` band mask serves every block."""
    if not plan.window_cut:
        return x[n : n + 1, :, width:]
    return x[n, :, width:].unflatten(1, (blocks, -1))[:, :, : plan.queries].transpose(0, 1)


def _keys_a(k: torch.Tensor, v: torch.Tensor, n: int, blocks: int, plan: _RowPlan):
    """The prefix keys and values within reach of row ``n``'s block queries, shaped for :func:`_queries_a`."""
    k, v = k[n : n + 1, :, plan.lo : plan.hi], v[n : n + 1, :, plan.lo : plan.hi]
    if plan.window_cut:
        k, v = k.expand(blocks, -1, -1, -1), v.expand(blocks, -1, -1, -1)
    return k, v


class _SplitAttention(torch.autograd.Function):
    """The whole split attention of packed rows in CPU fused-kernel calls, merged through their log-sum-exp.

    Parts: the prefix self-attention (causal, sliding-window when the layer has one); every block against its own
    keys (causal, blocks as batch entries); per row, the block queries against the prefix keys within reach (no mask
    without a window, GQA native, the prefix K/V never copied; a ``(queries x window)`` band when the window cuts).
    Attention sinks add one more term to each query's log-sum-exp. The merged output is
    ``o = sum_p o_p * exp(lse_p - lse)`` with ``lse = logsumexp(lse_p, sink)``. Backward calls each part's backward
    kernel with the *merged* output and log-sum-exp, which is exactly the gradient of the joint softmax restricted to
    that part's keys; the gradients of the parts add up, and a sink's gradient is ``-sum p_sink * (dO . O)``.
    """

    @staticmethod
    def forward(ctx, q, k, v, sinks, width, blocks, plans, window, scale):
        acc = torch.promote_types(q.dtype, torch.float32)  # merge in at least fp32
        # (N, H, L, D) viewed from (N, L, H, D) memory: the layout the attention function returns, without a copy
        out = q.new_empty(q.size(0), q.size(2), q.size(1), v.size(-1)).transpose(1, 2)
        lse = q.new_empty(q.shape[:-1], dtype=acc)
        if width:
            o, o_lse = _sliding_forward(q[:, :, :width], k[:, :, :width], v[:, :, :width], window, scale)
            out[:, :, :width], lse[:, :, :width] = o, o_lse
        if blocks:
            tail = slice(width, None)
            o, o_lse = _sliding_forward(
                _to_blocks(q[:, :, tail], blocks),
                _to_blocks(k[:, :, tail], blocks),
                _to_blocks(v[:, :, tail], blocks),
                window,
                scale,
            )
            out[:, :, tail], lse[:, :, tail] = _from_blocks(o, blocks), _from_blocks(o_lse, blocks)
            for n, plan in enumerate(plans):
                if plan.hi <= plan.lo:
                    continue  # a one-token prompt: no prefix keys
                o_a, l_a = _cpu_flash(
                    _queries_a(q, n, width, blocks, plan),
                    *_keys_a(k, v, n, blocks, plan),
                    0.0,
                    False,
                    attn_mask=_prefix_mask(plan, window, q),
                    scale=scale,
                )
                o_b, l_b = _queries_a(out, n, width, blocks, plan), _queries_a(lse, n, width, blocks, plan)
                merged = torch.logaddexp(l_a, l_b)
                o_b.copy_(
                    o_a.to(acc) * (l_a - merged).exp_()[..., None] + o_b.to(acc) * (l_b - merged).exp_()[..., None]
                )
                l_b.copy_(merged)
        if sinks is not None:
            merged = torch.logaddexp(lse, sinks.detach().to(acc)[None, :, None])
            out.copy_(out.to(acc) * (lse - merged).exp_()[..., None])
            lse = merged
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.width, ctx.blocks, ctx.plans, ctx.window, ctx.scale = width, blocks, plans, window, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        width, blocks, plans, window, scale = ctx.width, ctx.blocks, ctx.plans, ctx.window, ctx.scale
        grad = grad_out
        tail = slice(width, None)
        if blocks:  # first, so that its block-major copies are freed before the gradients are allocated
            to_blocks = lambda x: _to_blocks(x[:, :, tail], blocks).contiguous()  # noqa: E731
            grads_b = _sliding_backward(
                to_blocks(grad),
                to_blocks(q),
                to_blocks(k),
                to_blocks(v),
                to_blocks(out),
                to_blocks(lse),
                window,
                scale,
            )
        # every position is written by the prefix or the block part before part A adds to it
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if blocks:
            for full, part in zip((grad_q, grad_k, grad_v), grads_b):
                full[:, :, tail] = _from_blocks(part, blocks)
            del grads_b
        if width:
            head = slice(0, width)
            parts = (grad[:, :, head], q[:, :, head], k[:, :, head], v[:, :, head], out[:, :, head], lse[:, :, head])
            grad_q[:, :, head], grad_k[:, :, head], grad_v[:, :, head] = _sliding_backward(*parts, window, scale)
        if blocks:
            for n, plan in enumerate(plans):
                if plan.hi <= plan.lo:
                    continue
                grad_a, q_a, out_a, lse_a = (_queries_a(x, n, width, blocks, plan) for x in (grad, q, out, lse))
                dq, dk, dv = _cpu_flash_backward(
                    grad_a,
                    q_a,
                    *_keys_a(k, v, n, blocks, plan),
                    out_a,
                    lse_a,
                    0.0,
                    False,
                    attn_mask=_prefix_mask(plan, window, q),
                    scale=scale,
                )
                _queries_a(grad_q, n, width, blocks, plan).add_(dq)
                grad_k[n, :, plan.lo : plan.hi] += dk.sum(0)
                grad_v[n, :, plan.lo : plan.hi] += dv.sum(0)
        grad_sinks = None
        if sinks is not None and ctx.needs_input_grad[3]:
            # d lse / d sink = p_sink, and d o / d sink = -p_sink * o (the sink's value is zero)
            p_sink = (sinks.detach().to(lse.dtype)[None, :, None] - lse).exp()
            grad_sinks = -(p_sink * (grad.to(lse.dtype) * out.to(lse.dtype)).sum(-1)).sum((0, 2)).to(sinks.dtype)
        return grad_q, grad_k, grad_v, grad_sinks, None, None, None, None, None


def _prefix_mask(plan: _RowPlan, window: int | None, like: torch.Tensor) -> torch.Tensor | None:
    if not plan.window_cut:
        return None
    return _additive(_prefix_band(plan.queries, plan.hi - plan.lo, window, like.device), like.dtype)


def _to_blocks(x: torch.Tensor, blocks: int) -> torch.Tensor:
    """``(N, h, G*W, ...)`` -> ``(N*G, h, W, ...)``: one batch entry per block."""
    return x.unflatten(2, (blocks, -1)).transpose(1, 2).flatten(0, 1)


def _from_blocks(x: torch.Tensor, blocks: int) -> torch.Tensor:
    """Inverse of :func:`_to_blocks`."""
    return x.unflatten(0, (-1, blocks)).transpose(1, 2).flatten(2, 3)


def _equal_head_dims(query, key, value):
    """Zero-pad queries/keys or values to one head dim (fused kernels need it; MLA models have ``v_head_dim !=
    qk_head_dim``). Zero columns change no score and no output column that is kept."""
    qk_dim, v_dim = query.size(-1), value.size(-1)
    if v_dim < qk_dim:
        value = F.pad(value, (0, qk_dim - v_dim))
    elif qk_dim < v_dim:
        query, key = F.pad(query, (0, v_dim - qk_dim)), F.pad(key, (0, v_dim - qk_dim))
    return query, key, value


def split_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: GroupedAttentionLayout,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention over packed rows: prefix self-attention once, then each block over ``[prefix; own block]``.

    Every part runs in a fused attention kernel; no score matrix is materialised (see the module docstring for the
    kernels used on each device). With attention ``dropout > 0`` or a logit ``softcap`` it falls back to
    :func:`materialized_split_attention`, which forms the scores explicitly, one block at a time.

    Args:
        query (`torch.Tensor` of shape `(N, H, L, D)`): ``L = prefix_width + num_blocks * block_width``.
        key (`torch.Tensor` of shape `(N, H_kv, L, D)`), value (`torch.Tensor` of shape `(N, H_kv, L, D_v)`): ``H``
            must be a multiple of ``H_kv`` (GQA); ``D_v`` may differ from ``D`` (MLA).
        layout ([`GroupedAttentionLayout`]): the row strides and prefix lengths.
        scaling (`float`, *optional*): score scale, defaults to ``D ** -0.5``.
        dropout (`float`): dropout on the attention probabilities (pass 0 outside training).
        sliding_window (`int`, *optional*): a query sees only keys fewer than ``sliding_window`` positions back
            (transformers' ``sliding_window_overlay``), counted in the stock row.
        sinks (`torch.Tensor` of shape `(H,)`, *optional*): attention-sink logits (GPT-OSS ``s_aux``), one extra
            softmax term per head with a zero value.
        softcap (`float`, *optional*): logit soft-capping ``softcap * tanh(score / softcap)`` (Gemma 2).

    Returns:
        `torch.Tensor` of shape `(N, L, H, D_v)`, the layout transformers' attention functions return.
    """
    _check_shapes(query, layout)
    _check_window(sliding_window)
    device = query.device.type
    if torch.is_autocast_enabled(device):
        # What SDPA does under autocast: run the kernels in the autocast dtype (rotary embeddings may have left
        # the queries and keys in fp32 while the values are already in bf16)
        dtype = torch.get_autocast_dtype(device)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if dropout or softcap is not None:
        if dropout:
            _warn_dropout_once()
        return materialized_split_attention(
            query,
            key,
            value,
            layout,
            scaling=scaling,
            dropout=dropout,
            sliding_window=sliding_window,
            sinks=sinks,
            softcap=softcap,
        )
    v_dim = value.size(-1)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    query, key, value = _equal_head_dims(query, key, value)
    width, blocks = layout.prefix_width, layout.num_blocks
    plans = _row_plans(layout.row_prefix_lengths(query.size(0)), layout.block_width, sliding_window)
    kernel = layout.kernel if layout.kernel != "auto" else ("merged" if device == "cpu" else "lower_right")
    if kernel == "merged":
        out = _SplitAttention.apply(query, key, value, sinks, width, blocks, plans, sliding_window, scaling)
    elif kernel == "lower_right":
        out = _lower_right_split_attention(query, key, value, layout, plans, sliding_window, sinks, scaling)
    else:
        raise ValueError(f"kernel={kernel!r} is not one of 'auto', 'merged', 'lower_right'.")
    if out.size(-1) != v_dim:
        out = out[..., :v_dim]
    return out.transpose(1, 2).contiguous()


def _check_shapes(query: torch.Tensor, layout: GroupedAttentionLayout) -> None:
    width, block, blocks = layout.prefix_width, layout.block_width, layout.num_blocks
    if query.size(2) != width + blocks * block:
        raise ValueError(
            f"Packed rows have {query.size(2)} positions but the layout describes {width} + {blocks} * {block}; "
            "build the layout from the same PackedGroups as the input ids."
        )


def _check_window(window) -> None:
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"sliding_window={window!r} must be a positive integer or None.")


def _sliding_allowed(queries: torch.Tensor, keys: torch.Tensor, window: int | None) -> torch.Tensor:
    """Allowed (query, key) pairs from their positions: causal, and within ``window`` when there is one."""
    distance = queries[:, None] - keys[None, :]
    allowed = distance >= 0
    return allowed & (distance < window) if window is not None else allowed


def _with_sink(q, k, v, sinks, scale, allowed):
    """Append a sink key to public-SDPA inputs (``k``, ``v`` with one head per query head): a key whose score is
    exactly the sink logit and whose value is zero. Queries get one extra dim equal to 1 (padded to 8 for the fused
    kernels) and the sink key ``sink / scale`` there; every other key has 0 there, so its score is unchanged."""
    pad = 8
    ones = torch.zeros(*q.shape[:-1], pad, dtype=q.dtype, device=q.device)
    ones[..., 0] = 1
    q = torch.cat([q, ones], dim=-1)
    k = F.pad(k, (0, pad))
    sink_key = _sink_key(k, sinks, scale, pad)
    k = torch.cat([sink_key, k], dim=2)
    v = torch.cat([v.new_zeros(v.size(0), v.size(1), 1, v.size(-1)), v], dim=2)
    allowed = torch.cat([allowed.new_ones(*allowed.shape[:-1], 1), allowed], dim=-1)
    return q, k, v, allowed


def _sink_key(k, sinks, scale, pad):
    column = (sinks.to(k.dtype) / scale)[None, :, None, None].expand(k.size(0), -1, 1, 1)
    zeros_before = k.new_zeros(k.size(0), k.size(1), 1, k.size(-1) - pad)
    zeros_after = k.new_zeros(k.size(0), k.size(1), 1, pad - 1)
    return torch.cat([zeros_before, column, zeros_after], dim=-1)


def _sliding_sdpa(q, k, v, window, scale, sinks=None, k_before=None, v_before=None) -> torch.Tensor:
    """Causal public-SDPA attention of equal-length sequences (``k``, ``v`` with one head per query head), limited
    to ``window`` when given; ``k_before``/``v_before`` are keys right before every sequence (a block's prefix keys
    within reach), seen causally from its first queries.

    The first ``window`` queries run in one call against ``[before; first window keys]``: with the lower-right causal
    bias (applied inside CUDA's flash and memory-efficient kernels) when no window cuts and there is no sink, else
    one ``(window x keys)`` boolean mask. Later queries go in chunks of ``window`` against the ``2 window - 1`` keys
    in reach, through one shared band mask. Sinks are an extra key of every call (see :func:`_with_sink`).
    """
    length, device = q.size(2), q.device
    before = k_before.size(2) if k_before is not None else 0
    head = length if window is None else min(length, window)
    kh, vh = k[:, :, :head], v[:, :, :head]
    if before:
        kh, vh = torch.cat([k_before, kh], dim=2), torch.cat([v_before, vh], dim=2)
    qh = q[:, :, :head]
    if sinks is None and (window is None or before + head - 1 < window):
        outs = [
            F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(head, before + head), scale=scale)
        ]
    else:
        # positions counted from the first key before the sequence
        allowed = _sliding_allowed(
            before + torch.arange(head, device=device), torch.arange(before + head, device=device), window
        )
        if sinks is not None:
            qh, kh, vh, allowed = _with_sink(qh, kh, vh, sinks, scale, allowed)
        outs = [F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=scale)]
    if head < length:
        for start, count, size in _chunks(length, window):
            qc = _chunk_queries(q, start, count, size)
            kc, vc = _chunk_keys(k, start, count, size, window)[0], _chunk_keys(v, start, count, size, window)[0]
            allowed = _chunk_band(size, size + window - 1, window, device)
            if sinks is not None:
                qc, kc, vc, allowed = _with_sink(qc, kc, vc, sinks, scale, allowed)
            outs.append(_unchunk(F.scaled_dot_product_attention(qc, kc, vc, attn_mask=allowed, scale=scale), count))
    return torch.cat(outs, dim=2)


def _lower_right_split_attention(query, key, value, layout, plans, window, sinks, scaling) -> torch.Tensor:
    """The split attention through public SDPA (autograd through SDPA): the path for CUDA and other devices.

    The prefix self-attention is causal SDPA. Block queries run in one SDPA call per packed row, each block a batch
    entry whose keys are the row's prefix keys within reach followed by the block (the prefix K/V are copied once per
    block), with a lower-right causal bias. Windows and sinks go through :func:`_sliding_sdpa`: masks of at most
    ``window x 2 window``. Returns ``(N, H, L, D)``.
    """
    width, blocks = layout.prefix_width, layout.num_blocks
    rep = query.size(1) // key.size(1)
    parts = []
    if width:
        q, k, v = query[:, :, :width], repeat_kv(key[:, :, :width], rep), repeat_kv(value[:, :, :width], rep)
        parts.append(_sliding_sdpa(q, k, v, window, scaling, sinks))
    if blocks:
        rows = []
        for n, plan in enumerate(plans):
            q = _to_blocks(query[n : n + 1, :, width:], blocks)
            k = repeat_kv(_to_blocks(key[n : n + 1, :, width:], blocks), rep)
            v = repeat_kv(_to_blocks(value[n : n + 1, :, width:], blocks), rep)
            k_before = v_before = None
            if plan.hi > plan.lo:
                k_before = repeat_kv(key[n : n + 1, :, plan.lo : plan.hi], rep).expand(blocks, -1, -1, -1)
                v_before = repeat_kv(value[n : n + 1, :, plan.lo : plan.hi], rep).expand(blocks, -1, -1, -1)
            rows.append(_from_blocks(_sliding_sdpa(q, k, v, window, scaling, sinks, k_before, v_before), blocks))
        parts.append(torch.cat(rows))
    return torch.cat(parts, dim=2)


_dropout_warned = False


def _warn_dropout_once() -> None:
    global _dropout_warned
    if not _dropout_warned:
        _dropout_warned = True
        logger.warning(
            "The split attention with attention dropout > 0 runs a slower attention that materialises the scores "
            "(the trainers refuse such models: completions sharing a prompt would share its dropout mask). Set "
            "attention_dropout=0.0 in the model config to use the fused kernels."
        )


def _explicit_attention(q, k, v, allowed, sinks, scale: float, softcap: float | None, dropout: float):
    """Eager attention of one query chunk (``k``, ``v`` with one head per query head) against its keys: scores,
    soft-cap, mask, softmax in at least fp32 with the sink logit as one more column, dropout, values."""
    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.to(torch.promote_types(q.dtype, torch.float32)).masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        sink = sinks.to(scores.dtype)[None, :, None, None].expand(*scores.shape[:-1], 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1)
    probs = probs.to(q.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout, training=True)
    return probs @ v


def materialized_split_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: GroupedAttentionLayout,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The split attention with explicit score matrices: the path for attention dropout and logit soft-capping.

    Same arguments and result as :func:`split_attention`. Scores are formed one block at a time (each block's
    queries against the prefix keys within reach and its own keys, ``W x (prefix + W)``) and the prefix in chunks of
    queries, joined in one eager softmax. With gradients on, each piece is recomputed in the backward
    (activation checkpointing, which also replays the dropout mask), so memory holds one piece's scores at a time.
    """
    _check_shapes(query, layout)
    _check_window(sliding_window)
    batch, heads, seq_len, _ = query.shape
    rep = heads // key.size(1)
    width, block, blocks = layout.prefix_width, layout.block_width, layout.num_blocks
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    plans = _row_plans(layout.row_prefix_lengths(batch), block, sliding_window)
    device = query.device
    checkpointed = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))

    def piece(q, k, v, allowed):
        args = (q, repeat_kv(k, rep), repeat_kv(v, rep), allowed, sinks, scaling, softcap, dropout)
        if checkpointed:
            return checkpoint(_explicit_attention, *args, use_reentrant=False)
        return _explicit_attention(*args)

    parts = []
    chunk = max(block, 64)
    for start in range(0, width, chunk):
        stop = min(start + chunk, width)
        lo = 0 if sliding_window is None else max(0, start - sliding_window + 1)
        allowed = _sliding_allowed(
            torch.arange(start, stop, device=device), torch.arange(lo, stop, device=device), sliding_window
        )
        parts.append(piece(query[:, :, start:stop], key[:, :, lo:stop], value[:, :, lo:stop], allowed))
    if blocks:
        rows = []
        for n, plan in enumerate(plans):
            key_positions = torch.cat(
                [torch.arange(plan.lo, plan.hi, device=device), plan.hi + torch.arange(block, device=device)]
            )
            allowed = _sliding_allowed(plan.hi + torch.arange(block, device=device), key_positions, sliding_window)
            row = []
            for g in range(blocks):
                cols = slice(width + g * block, width + (g + 1) * block)
                k = torch.cat([key[n : n + 1, :, plan.lo : plan.hi], key[n : n + 1, :, cols]], dim=2)
                v = torch.cat([value[n : n + 1, :, plan.lo : plan.hi], value[n : n + 1, :, cols]], dim=2)
                row.append(piece(query[n : n + 1, :, cols], k, v, allowed))
            rows.append(torch.cat(row, dim=2))
        parts.append(torch.cat(rows))
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous()


def _unsupported(module: torch.nn.Module, what: str) -> ValueError:
    model_type = getattr(getattr(module, "config", None), "model_type", type(module).__name__)
    return ValueError(f"Prefix grouping cannot run model_type={model_type!r}: {what}. Instead, {FALLBACK_HINT}.")


def _eager_forward(module: torch.nn.Module) -> Callable:
    # "eager" is not in the registry: each modeling file defines its own `eager_attention_forward`
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise _unsupported(module, f"{type(module).__name__} has no module-level `eager_attention_forward`")
    return fn


def _stock_window(module: torch.nn.Module, given: int | None) -> int | None:
    """The sliding window of this layer's stock mask, which the attention function does not see in a packed forward.

    transformers builds one mask per layer type: ``create_sliding_window_causal_mask`` (window
    ``config.sliding_window``) for layers whose ``config.layer_types`` entry is ``"sliding_attention"``, or for every
    layer of a model without ``layer_types`` whose ``config.sliding_window`` is set (Mistral, Phi-3, StarCoder2).
    The window the layer passes to its attention function (``sliding_window=``) must agree; a model where it does not
    is refused rather than guessed.
    """
    config = getattr(module, "config", None)
    layer = getattr(module, "layer_idx", None)
    if config is None or layer is None:
        return given
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        sliding = layer_types[layer] == "sliding_attention"
        expected = getattr(config, "sliding_window", None) if sliding else None
    else:
        expected = getattr(config, "sliding_window", None)
    if given != expected:
        raise _unsupported(
            module,
            f"layer {layer} passes sliding_window={given} to its attention but its stock mask uses "
            f"sliding_window={expected}",
        )
    return expected


def _grouped_forward(base: str) -> Callable:
    def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        layout = kwargs.pop(LAYOUT_KWARG, None)
        if layout is None:
            if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.long:
                raise _unsupported(module, "its attention layers do not receive the keyword arguments of the forward")
            base_fn = sdpa_attention_forward if base == "sdpa" else _eager_forward(module)
            return base_fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        window = _stock_window(module, kwargs.get("sliding_window"))
        softcap = kwargs.get("softcap")
        if softcap is not None and base == "sdpa":
            raise _unsupported(
                module, f"softcap={softcap} needs attn_implementation='eager' (sdpa has no soft-capping)"
            )
        if kwargs.get("s_aux") is not None and base == "sdpa":
            raise _unsupported(module, "attention sinks need attn_implementation='eager' (sdpa does not apply them)")
        if kwargs.get("position_bias") is not None:
            raise _unsupported(module, "its attention adds a position bias, which the split attention does not")
        if getattr(module, "is_causal", True) is False:
            raise _unsupported(module, "the attention is not causal")
        layout.calls += 1
        out = split_attention(
            query,
            key,
            value,
            layout,
            scaling=scaling,
            dropout=dropout,
            sliding_window=window,
            sinks=kwargs.get("s_aux"),
            softcap=softcap,
        )
        return out, None

    attention_forward.__name__ = f"prefix_grouper_{base}_attention_forward"
    return attention_forward


def register_grouped_attention() -> None:
    """Register the grouped attention functions with transformers (idempotent; done by the installer)."""
    for base, name in GROUPED_IMPLEMENTATIONS.items():
        if name not in AttentionInterface():
            AttentionInterface.register(name, _grouped_forward(base))
        if name not in AttentionMaskInterface():
            # Ordinary forwards (generation) build the base implementation's padding/causal mask
            AttentionMaskInterface.register(name, sdpa_mask if base == "sdpa" else eager_mask)


def check_grouped_calls(layout: GroupedAttentionLayout, model) -> None:
    """Raise unless every layer of ``model`` ran the split attention in the forward that carried ``layout``.

    A layer that bypasses the attention-function registry would have attended over the integer segment ids as a
    mask, so the packed forward is refused rather than trusted.
    """
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    num_layers = config.get_text_config().num_hidden_layers
    if layout.calls < num_layers:
        raise ValueError(
            f"Prefix grouping cannot run model_type={config.model_type!r}: only {layout.calls} of its {num_layers} "
            f"layers used the grouped attention. Instead, {FALLBACK_HINT}."
        )


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
    current = attn_implementation(config)
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
    other_layers = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if other_layers:
        raise fail(f"layer_types {other_layers} mix tokens in ways the shared-prefix layout does not reproduce")
    window = getattr(config, "sliding_window", None)
    if "sliding_attention" in layer_types or (not layer_types and window is not None):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise fail(f"its sliding-window layers have sliding_window={window!r}; set a positive integer")
    if getattr(config, "reorder_and_upcast_attn", False):
        raise fail("reorder_and_upcast_attn=True bypasses the attention-function registry")

    name = GROUPED_IMPLEMENTATIONS[current]
    register_grouped_attention()
    base_model.set_attn_implementation(name)
    if attn_implementation(base_model.config) != name:
        raise fail("its attention does not go through transformers' AttentionInterface")
    return name
