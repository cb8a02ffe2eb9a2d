"""Preference rows packed one prompt at a time, as pure functions over tensors.

TRL's DPO collator stacks ``[prompt; chosen]`` and ``[prompt; rejected]`` as separate right-padded rows, so every
forward encodes each prompt twice (four times with a reference model). The rows of one prompt are a Prefix Grouper
group of two completions, so this module turns the stock batch into the packed rows of
:func:`~trl_ext.prefix_grouper.layout.pack_groups` and maps the per-token outputs back to the stock layout.

The stock forward scores position ``t`` of a row with the label of token ``t + 1`` (``labels[:, 1:]``). The prompt
of a row is everything before its first labelled token (at least its first token, which is never scored); the
completion runs from there to the row's last real token. Rows whose prompts are identical token for token share one
packed row, wherever they are in the batch: the chosen and rejected rows of a pair, and several pairs of one prompt.
A row whose prompt differs from its partner's (``max_length`` truncation with ``truncation_mode="keep_end"`` cuts
the prompts of a pair differently) keeps a packed row of its own, which encodes it exactly as the stock row does.

Positions are the stock row's columns (right-padded rows number tokens from 0), so the packing uses
``count_padding=False``; for rotary models the largest stock position is carried on a padding cell, for
length-dependent RoPE.

Example:
    ```py
    >>> import torch
    >>> from trl_ext.prefix_sharing.pairs import pack_pairs, unpack
    >>> input_ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 9, 9, 9]])   # [prompt 5 6 | chosen 7 8], [... | 9 9 9]
    >>> attention_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    >>> labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, -100, 9, 9, 9]])
    >>> pairs = pack_pairs(input_ids, attention_mask, labels)
    >>> pairs.packed.input_ids.tolist()  # one row: [5 | 6 7 8 | 6 9 9 9]
    [[5, 6, 7, 8, 0, 6, 9, 9, 9]]
    >>> unpack(pairs.packed.shift_labels.float(), pairs).tolist()  # each label at its stock place
    [[0.0, 7.0, 8.0, 0.0], [0.0, 9.0, 9.0, 9.0]]
    ```
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..prefix_grouper.layout import IGNORE_INDEX, PackedGroups, find_groups, pack_groups, ungroup


@dataclass
class PackedPairs:
    """Stock preference rows packed one row per distinct prompt, and the map back.

    Attributes:
        packed ([`~trl_ext.prefix_grouper.layout.PackedGroups`]): the packed rows (``count_padding=False``).
        groups (`list[list[int]]`): the stock rows of each packed row.
        label_mask (`torch.BoolTensor` of shape `(B, L - 1)`): stock positions with a label (``labels[:, 1:] !=
            -100``), where the stock fused forward gives a value.
        target_index (`torch.LongTensor` of shape `(B, T)`): for completion token ``t`` of stock row ``b``, its
            column in the stock ``(B, L - 1)`` outputs (0 where ``target_mask`` is False).
        target_mask (`torch.BoolTensor` of shape `(B, T)`): completion tokens the packing scores.
        prompt_tokens (`int`), completion_tokens (`int`): real tokens of the stock rows before and after their
            completion starts.
    """

    packed: PackedGroups
    groups: list[list[int]]
    label_mask: torch.Tensor
    target_index: torch.Tensor
    target_mask: torch.Tensor
    prompt_tokens: int
    completion_tokens: int

    @property
    def shared_rows(self) -> int:
        """Stock rows whose prompt is encoded by a packed row it shares with another stock row."""
        return sum(len(group) for group in self.groups if len(group) > 1)


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row is 1s then 0s (the DPO collator's padding), with at least one real token."""
    if attention_mask.dim() != 2 or attention_mask.size(1) == 0:
        return False
    mask = attention_mask.bool()
    return bool(mask[:, 0].all()) and not bool((mask[:, 1:] & ~mask[:, :-1]).any())


def pack_pairs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    pad_token_id: int = 0,
    carry_padded_width: bool = True,
) -> PackedPairs:
    """Pack right-padded ``[prompt; completion]`` rows one row per distinct prompt (see the module docstring).

    Args:
        input_ids (`torch.LongTensor` of shape `(B, L)`): right-padded rows, as TRL's ``DataCollatorForPreference``
            builds them (chosen rows, then rejected rows).
        attention_mask (`torch.Tensor` of shape `(B, L)`): 1 on real tokens, 1s then 0s in every row.
        labels (`torch.LongTensor` of shape `(B, L)`): the token ids to score, ``-100`` elsewhere.
        pad_token_id (`int`): id written on the packed padding (never attended to, never scored).
        carry_padded_width (`bool`): write the stock forward's largest position id, ``L - 1`` (the padded width:
            rotary models number every column), on a padding cell, so that length-dependent RoPE gets the stock
            frequencies. Models with a table of absolute positions (GPT-2, OPT) have no such frequencies, and may
            never look up position ``L - 1`` (OPT numbers positions from the mask): pass `False` for them.

    Returns:
        [`PackedPairs`]

    Raises:
        ValueError: when the rows are not right-padded or the shapes disagree.
    """
    if input_ids.shape != attention_mask.shape or input_ids.shape != labels.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and labels "
            f"{tuple(labels.shape)} must be the same (batch, length) shape."
        )
    if not is_right_padded(attention_mask):
        raise ValueError("attention_mask must be right-padded (1s then 0s in every row), as DPO's collator builds it.")
    batch, width = input_ids.shape
    device = input_ids.device
    lengths = attention_mask.sum(1)
    columns = torch.arange(width, device=device)
    labelled = (labels != IGNORE_INDEX) & (columns[None, :] >= 1) & (columns[None, :] < lengths[:, None])
    # The completion starts at the first labelled token after the first; a row without one is all prompt
    first = torch.where(labelled, columns[None, :], width).min(1).values
    starts = torch.minimum(first, lengths)
    prompt_width = int(starts.max())
    completion_width = int((lengths - starts).max())

    prompt_cols = torch.arange(prompt_width, device=device)
    completion_cols = torch.arange(completion_width, device=device)
    # Left-padded prompts: column c of the prompt area holds token c - (prompt_width - start)
    source = prompt_cols[None, :] - (prompt_width - starts[:, None])
    prompt_mask = source >= 0
    prompt_ids = input_ids.gather(1, source.clamp(min=0)).masked_fill(~prompt_mask, pad_token_id)
    target = starts[:, None] + completion_cols[None, :]
    completion_mask = target < lengths[:, None]
    completion_ids = input_ids.gather(1, target.clamp(max=width - 1)).masked_fill(~completion_mask, pad_token_id)

    groups = find_groups(prompt_ids, prompt_mask)
    packed = pack_groups(
        prompt_ids,
        prompt_mask.long(),
        completion_ids,
        completion_mask.long(),
        groups,
        pad_token_id,
        count_padding=False,
        max_position=width - 1 if carry_padded_width else None,
    )
    prompt_tokens = int(starts.sum())
    return PackedPairs(
        packed=packed,
        groups=groups,
        label_mask=labels[:, 1:] != IGNORE_INDEX,
        target_index=(target - 1).clamp(min=0).masked_fill(~completion_mask, 0),
        target_mask=completion_mask,
        prompt_tokens=prompt_tokens,
        completion_tokens=int(lengths.sum()) - prompt_tokens,
    )


def unpack(values: torch.Tensor, pairs: PackedPairs) -> torch.Tensor:
    """Map per-token outputs of the packed rows to the stock ``(B, L - 1)`` layout of TRL's fused forward.

    Position ``t`` of stock row ``b`` receives the packed value that predicts its token ``t + 1``; positions without a
    label are 0, as in the stock fused forward. Differentiable with respect to ``values``.

    Args:
        values (`torch.Tensor` of shape `(N, L_packed)`): e.g. ``log_probs`` of the packed forward.
        pairs ([`PackedPairs`]): the packing that produced ``values``.
    """
    completions = ungroup(values, pairs.packed)  # (B, T): completion token t of each stock row
    batch, width = pairs.label_mask.shape
    out = completions.new_zeros(batch, width)
    rows = torch.arange(batch, device=completions.device)[:, None].expand_as(pairs.target_index)
    out = out.index_put(
        (rows[pairs.target_mask], pairs.target_index[pairs.target_mask]), completions[pairs.target_mask]
    )
    return out.masked_fill(~pairs.label_mask, 0)
