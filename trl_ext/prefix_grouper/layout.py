"""The shared-prefix layout of Prefix Grouper, as pure functions over tensors.

GRPO scores ``G`` completions of each prompt. The stock forward runs ``[prompt; completion_i]`` once per
completion, so the prompt is encoded ``G`` times. Prefix Grouper packs one row per group::

    [ p_0 .. p_{P-2} | p_{P-1} r_1 | p_{P-1} r_2 | ... | p_{P-1} r_G ]
      shared prefix    block 1       block 2             block G

The last prompt token ``p_{P-1}`` is the one whose logits predict the first token of *every* completion. It opens
each completion block, so every scored position has exactly one next-token label and the row can be scored by
TRL's fused LM head as it is (``shift_labels``). This costs ``G`` extra token rows per group; in exchange the prompt
proper is encoded once.

Attention (see :func:`attention_allowed`): prefix tokens are causal among themselves; a block token attends to the
whole prefix and causally to its own block, never to a sibling. Position ids are the tokens' columns in the stock
``[prompt; completion]`` row, so every completion restarts right after the prompt (``P, P+1, ...`` for an unpadded
prompt). TRL's stock forward numbers positions from the start of the *left-padded* row; the layout keeps that offset,
which makes absolute-position models (GPT-2) reproduce the stock forward exactly and is immaterial for rotary models.
Models that number positions from the attention mask instead (OPT) get positions without the offset
(``count_padding=False``).

Rows are laid out with fixed strides so that attention can view them without gathers: the prefix area is
``prefix_width`` wide and each of the ``num_blocks`` block slots is ``block_width`` wide; shorter segments are
right-padded. Completion tokens after the end of the completion mask (after EOS) are dropped: the stock forward
neither attends to nor scores them.

Example:
    ```py
    >>> import torch
    >>> from trl_ext.prefix_grouper.layout import find_groups, pack_groups, ungroup
    >>> prompt_ids = torch.tensor([[0, 5, 6], [0, 5, 6], [7, 8, 9]])
    >>> prompt_mask = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1]])
    >>> completion_ids = torch.tensor([[10, 11], [12, 0], [13, 14]])
    >>> completion_mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    >>> groups = find_groups(prompt_ids, prompt_mask)
    >>> groups
    [[0, 1], [2]]
    >>> packed = pack_groups(prompt_ids, prompt_mask, completion_ids, completion_mask, groups)
    >>> packed.input_ids[0].tolist()  # [p_0 | p_1 r_1 | p_1 r_2], block slots 3 wide
    [5, 0, 6, 10, 11, 6, 12, 0]
    >>> ungroup(packed.shift_labels.float(), packed).tolist()  # each completion token, at its stock place
    [[10.0, 11.0], [12.0, 0.0], [13.0, 14.0]]
    ```
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
PAD_SEGMENT = -1
PREFIX_SEGMENT = 0


@dataclass
class PackedGroups:
    """A batch of groups packed one row per group, plus what is needed to map outputs back.

    Shapes: ``N`` packed rows, ``L = prefix_width + num_blocks * block_width`` columns, ``B`` stock rows and ``T``
    stock completion columns.

    Attributes:
        input_ids (`torch.LongTensor` of shape `(N, L)`): packed token ids (padding is ``pad_token_id``).
        position_ids (`torch.LongTensor` of shape `(N, L)`): the tokens' positions in the stock row (0 on padding,
            except the one cell that carries ``max_position`` when it is given).
        shift_labels (`torch.LongTensor` of shape `(N, L)`): the token each position predicts, ``-100`` where
            nothing is scored (prefix, the last token of a block, padding).
        segment_ids (`torch.LongTensor` of shape `(N, L)`): ``0`` prefix, ``i`` block ``i`` (1-based), ``-1``
            padding.
        prefix_lengths (`torch.LongTensor` of shape `(N,)`): real tokens in each prefix area (prompt length - 1).
        block_lengths (`torch.LongTensor` of shape `(N, num_blocks)`): real tokens in each block slot
            (1 + completion length), ``0`` for an unused slot.
        prefix_width (`int`), block_width (`int`), num_blocks (`int`): the fixed strides of the row.
        source_index (`torch.LongTensor` of shape `(B, T)`): for each stock completion position, its flat index
            in the packed ``(N * L)`` tensor (0 where ``source_mask`` is False).
        source_mask (`torch.BoolTensor` of shape `(B, T)`): stock positions this packing scores.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    shift_labels: torch.Tensor
    segment_ids: torch.Tensor
    prefix_lengths: torch.Tensor
    block_lengths: torch.Tensor
    prefix_width: int
    block_width: int
    num_blocks: int
    source_index: torch.Tensor
    source_mask: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.input_ids.size(0)

    @property
    def seq_len(self) -> int:
        return self.input_ids.size(1)


def _check_masks(prompt_mask: torch.Tensor, completion_mask: torch.Tensor) -> None:
    # TRL left-pads prompts (0s then 1s) and right-pads completions (1s then 0s); a hole in either would make the
    # stock forward attend in a way the packed row does not reproduce.
    if prompt_mask.size(1) and (prompt_mask[:, 1:] < prompt_mask[:, :-1]).any():
        raise ValueError("prompt_mask must be left-padded (0s then 1s in every row), as TRL builds it.")
    if completion_mask.size(1) and (completion_mask[:, 1:] > completion_mask[:, :-1]).any():
        raise ValueError("completion_mask must be right-padded (1s then 0s in every row), as TRL builds it.")
    if (prompt_mask.sum(1) == 0).any():
        empty = (prompt_mask.sum(1) == 0).nonzero().flatten().tolist()
        raise ValueError(f"Rows {empty} have an empty prompt; a completion needs at least one prompt token.")


def find_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[list[int]]:
    """Group the rows whose unpadded prompt ids are identical, in order of first appearance.

    The group size is never assumed: a process's slice of TRL's batch can split a group, and ``num_generations``
    can exceed the per-device batch, so groups here may have any size.

    Args:
        prompt_ids (`torch.LongTensor` of shape `(B, P)`): left-padded prompt ids.
        prompt_mask (`torch.Tensor` of shape `(B, P)`): 1 on real prompt tokens.

    Returns:
        `list[list[int]]`: row indices of each group, ascending.

    Example:
        ```py
        >>> find_groups(torch.tensor([[1, 2], [3, 4], [0, 2]]), torch.tensor([[1, 1], [1, 1], [0, 1]]))
        [[0], [1], [2]]
        ```
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, (ids, mask) in enumerate(zip(prompt_ids.tolist(), prompt_mask.tolist())):
        key = tuple(token for token, keep in zip(ids, mask) if keep)
        groups.setdefault(key, []).append(row)
    return list(groups.values())


def split_groups(groups: list[list[int]], max_size: int) -> list[list[int]]:
    """Split every group into consecutive sub-groups of at most ``max_size`` rows (each repeats the prefix).

    Example:
        ```py
        >>> split_groups([[0, 1, 2, 3, 4], [5]], 2)
        [[0, 1], [2, 3], [4], [5]]
        ```
    """
    if max_size < 1:
        raise ValueError(f"max_size={max_size} must be at least 1.")
    return [group[i : i + max_size] for group in groups for i in range(0, len(group), max_size)]


def chunk_groups(groups: list[list[int]], max_rows: int) -> list[list[list[int]]]:
    """Pack whole groups, in order, into chunks of at most ``max_rows`` stock rows (one forward per chunk).

    A group larger than ``max_rows`` gets a chunk of its own; call :func:`split_groups` first to avoid that.

    Example:
        ```py
        >>> chunk_groups([[0, 1], [2, 3], [4]], 3)
        [[[0, 1]], [[2, 3], [4]]]
        ```
    """
    chunks: list[list[list[int]]] = []
    rows = 0
    for group in groups:
        if chunks and rows + len(group) <= max_rows:
            chunks[-1].append(group)
            rows += len(group)
        else:
            chunks.append([group])
            rows = len(group)
    return chunks


def pack_groups(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    groups: list[list[int]],
    pad_token_id: int = 0,
    count_padding: bool = True,
    max_position: int | None = None,
) -> PackedGroups:
    """Pack the given groups of a stock GRPO batch, one row per group (see the module docstring).

    Args:
        prompt_ids (`torch.LongTensor` of shape `(B, P)`): left-padded prompts, as in TRL's batch.
        prompt_mask (`torch.Tensor` of shape `(B, P)`): 1 on real prompt tokens.
        completion_ids (`torch.LongTensor` of shape `(B, T)`): right-padded completions.
        completion_mask (`torch.Tensor` of shape `(B, T)`): 1 on completion tokens up to and including EOS.
        groups (`list[list[int]]`): rows of each group (identical prompts), e.g. from :func:`find_groups`. Rows
            left out are not scored (their ``source_mask`` is all False).
        pad_token_id (`int`): id written on padding positions (never attended to by real tokens, never scored).
        count_padding (`bool`): whether position ids count the prompt's left padding, as models that number
            positions by column do (``arange``, the default). With `False` every prompt starts at position 0, as in
            models that derive positions from the attention mask (OPT's ``cumsum``).
        max_position (`int`, *optional*): the largest position id of the stock forward, written on one padding cell
            (a padding column is added when the rows have none). Models whose rotary frequencies depend on the
            largest position of the forward (``dynamic`` and ``longrope`` RoPE) then use the frequencies of the stock
            forward. Padding cells are never attended to by real tokens, so nothing else changes.

    Returns:
        [`PackedGroups`]
    """
    _check_masks(prompt_mask, completion_mask)
    device = prompt_ids.device
    batch, prompt_width = prompt_ids.shape
    num_completion_cols = completion_ids.size(1)
    prompt_lengths = prompt_mask.sum(1).tolist()
    completion_lengths = completion_mask.sum(1).tolist()
    for group in groups:
        if any(prompt_lengths[row] != prompt_lengths[group[0]] for row in group):
            raise ValueError(f"Rows {group} are grouped but their prompts have different lengths.")

    prefix_lengths = [prompt_lengths[group[0]] - 1 for group in groups]
    prefix_width = max(prefix_lengths, default=0)
    num_blocks = max((len(group) for group in groups), default=0)
    block_width = 1 + max((completion_lengths[row] for group in groups for row in group), default=0)
    if (
        max_position is not None
        and groups
        and not _has_padding(groups, prefix_lengths, completion_lengths, block_width)
    ):
        block_width += 1  # room for the cell that carries max_position
    seq_len = prefix_width + num_blocks * block_width
    num_rows = len(groups)

    input_ids = torch.full((num_rows, seq_len), pad_token_id, dtype=torch.long, device=device)
    position_ids = torch.zeros((num_rows, seq_len), dtype=torch.long, device=device)
    shift_labels = torch.full((num_rows, seq_len), IGNORE_INDEX, dtype=torch.long, device=device)
    segment_ids = torch.full((num_rows, seq_len), PAD_SEGMENT, dtype=torch.long, device=device)
    block_lengths = torch.zeros((num_rows, num_blocks), dtype=torch.long, device=device)
    source_index = torch.zeros((batch, num_completion_cols), dtype=torch.long, device=device)
    source_mask = torch.zeros((batch, num_completion_cols), dtype=torch.bool, device=device)
    columns = torch.arange(max(prompt_width + num_completion_cols, 1), device=device)

    for n, group in enumerate(groups):
        first = group[0]
        prefix_len = prefix_lengths[n]
        pad = prompt_width - prefix_len - 1  # left padding of this prompt in the stock row
        shift = 0 if count_padding else pad
        input_ids[n, :prefix_len] = prompt_ids[first, pad : pad + prefix_len]
        position_ids[n, :prefix_len] = columns[pad : pad + prefix_len] - shift
        segment_ids[n, :prefix_len] = PREFIX_SEGMENT
        for i, row in enumerate(group):
            length = completion_lengths[row]
            start = prefix_width + i * block_width
            block = slice(start, start + 1 + length)
            input_ids[n, start] = prompt_ids[row, -1]
            input_ids[n, start + 1 : start + 1 + length] = completion_ids[row, :length]
            position_ids[n, block] = columns[prompt_width - 1 : prompt_width + length] - shift
            shift_labels[n, start : start + length] = completion_ids[row, :length]
            segment_ids[n, block] = i + 1
            block_lengths[n, i] = 1 + length
            source_index[row, :length] = n * seq_len + start + columns[:length]
            source_mask[row, :length] = True

    if max_position is not None and num_rows:
        padding = (segment_ids == PAD_SEGMENT).flatten().nonzero()
        position_ids.view(-1)[padding[-1]] = max_position

    return PackedGroups(
        input_ids=input_ids,
        position_ids=position_ids,
        shift_labels=shift_labels,
        segment_ids=segment_ids,
        prefix_lengths=torch.tensor(prefix_lengths, dtype=torch.long, device=device),
        block_lengths=block_lengths,
        prefix_width=prefix_width,
        block_width=block_width,
        num_blocks=num_blocks,
        source_index=source_index,
        source_mask=source_mask,
    )


def _has_padding(groups, prefix_lengths, completion_lengths, block_width) -> bool:
    """Whether the packed rows will have at least one padding cell."""
    prefix_width = max(prefix_lengths)
    num_blocks = max(len(group) for group in groups)
    for group, prefix_len in zip(groups, prefix_lengths):
        if prefix_len < prefix_width or len(group) < num_blocks:
            return True
        if any(1 + completion_lengths[row] < block_width for row in group):
            return True
    return False


def attention_allowed(segment_ids: torch.Tensor) -> torch.Tensor:
    """Which packed positions each position attends to: the attention structure of the layout.

    ``allowed[n, q, k]`` is True when query ``q`` may attend to key ``k`` in row ``n``: a prefix query sees the
    prefix causally; a block query sees the whole prefix and its own block causally, never a sibling block. A padding
    query sees only itself, so that every softmax row stays finite.

    Args:
        segment_ids (`torch.LongTensor` of shape `(N, L)`): from [`PackedGroups`].

    Returns:
        `torch.BoolTensor` of shape `(N, L, L)`.

    Example:
        ```py
        >>> attention_allowed(torch.tensor([[0, 1, 1, 2, 2]]))[0].int().tolist()
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 1, 0], [1, 0, 0, 1, 1]]
        ```
    """
    seq_len = segment_ids.size(1)
    q_seg = segment_ids[:, :, None]
    k_seg = segment_ids[:, None, :]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=segment_ids.device).tril()
    real = (q_seg != PAD_SEGMENT) & (k_seg != PAD_SEGMENT)
    sees_prefix = k_seg == PREFIX_SEGMENT
    same_block = (q_seg == k_seg) & (k_seg != PREFIX_SEGMENT)
    allowed = real & causal & (sees_prefix | same_block)
    eye = torch.eye(seq_len, dtype=torch.bool, device=segment_ids.device)
    return allowed | (eye & (q_seg == PAD_SEGMENT))


def ungroup(values: torch.Tensor, packed: PackedGroups) -> torch.Tensor:
    """Map per-token outputs of the packed rows back to the stock ``(B, T)`` completion layout.

    Position ``t`` of stock completion ``b`` receives the packed value at the position that predicts its token ``t``;
    positions the packing does not score (after EOS, rows of other chunks) are 0, as in TRL's fused forward.

    Args:
        values (`torch.Tensor` of shape `(N, L)`): e.g. the per-token log-probs of the packed forward.
        packed ([`PackedGroups`]): the packing that produced ``values``.

    Returns:
        `torch.Tensor` of shape `(B, T)`, differentiable with respect to ``values``.
    """
    gathered = values.reshape(-1)[packed.source_index.reshape(-1)].view_as(packed.source_index)
    return gathered.masked_fill(~packed.source_mask, 0)
