"""Pure functions of Prefix Grouper against slow obvious references, and the split attention against dense masks."""

import pytest
import torch
from prefix_grouper_helpers import dense_reference_mask, make_batch, model_path, peak_backward_bytes, sharpen_
from transformers import AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

from trl_ext.prefix_grouper import (
    GroupedAttentionLayout,
    attention_allowed,
    chunk_groups,
    find_groups,
    install_grouped_attention,
    materialized_split_attention,
    pack_groups,
    split_attention,
    split_groups,
    ungroup,
)
from trl_ext.prefix_grouper.attention import LAYOUT_KWARG

# ---------------------------------------------------------------------------------------------------------------
# Slow references, written token by token


def reference_groups(prompt_ids, prompt_mask):
    prompts = [[t for t, m in zip(ids, mask) if m] for ids, mask in zip(prompt_ids.tolist(), prompt_mask.tolist())]
    groups, assigned = [], set()
    for i in range(len(prompts)):
        if i not in assigned:
            group = [j for j in range(len(prompts)) if prompts[j] == prompts[i]]
            assigned.update(group)
            groups.append(group)
    return groups


def reference_rows(batch, groups):
    """Per packed row: the prefix and the (stock row, block) pairs as lists of (token, position, label, segment)."""
    prompt_width = batch["prompt_ids"].size(1)
    rows = []
    for group in groups:
        first = group[0]
        prompt = [t for t, m in zip(batch["prompt_ids"][first].tolist(), batch["prompt_mask"][first].tolist()) if m]
        pad = prompt_width - len(prompt)
        prefix = [(prompt[j], pad + j, -100, 0) for j in range(len(prompt) - 1)]
        blocks = []
        for i, row in enumerate(group):
            completion = [
                t for t, m in zip(batch["completion_ids"][row].tolist(), batch["completion_mask"][row].tolist()) if m
            ]
            tokens = [prompt[-1]] + completion
            labels = completion + [-100]
            block = [(tokens[j], prompt_width - 1 + j, labels[j], i + 1) for j in range(len(tokens))]
            blocks.append((row, block))
        rows.append((prefix, blocks))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Layout


@pytest.mark.parametrize("rows", ["aaaa", "abab", "abcabcab", "a", "abcdef"])
def test_find_groups_matches_reference(rows):
    batch = make_batch(rows=rows)
    assert find_groups(batch["prompt_ids"], batch["prompt_mask"]) == reference_groups(
        batch["prompt_ids"], batch["prompt_mask"]
    )


def test_find_groups_ignores_padding_not_content():
    ids = torch.tensor([[0, 0, 5, 6], [0, 5, 5, 6], [9, 0, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]])
    assert find_groups(ids, mask) == [[0, 2], [1]]


def test_split_and_chunk_groups():
    assert split_groups([[0, 1, 2], [3, 4, 5, 6, 7]], 2) == [[0, 1], [2], [3, 4], [5, 6], [7]]
    assert chunk_groups([[0, 1], [2], [3, 4], [5, 6], [7]], 3) == [[[0, 1], [2]], [[3, 4]], [[5, 6], [7]]]
    with pytest.raises(ValueError, match="max_size=0"):
        split_groups([[0]], 0)


@pytest.mark.parametrize("rows,truncated", [("aabacbcb", None), ("abcabcab", 4), ("aaaaaaaa", None)])
def test_pack_groups_matches_reference(rows, truncated):
    batch = make_batch(seed=1, rows=rows, truncated_row=truncated)
    groups = split_groups(find_groups(batch["prompt_ids"], batch["prompt_mask"]), 3)
    packed = pack_groups(
        batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"], groups, 0
    )
    expected = reference_rows(batch, groups)
    assert packed.num_rows == len(groups)
    assert packed.seq_len == packed.prefix_width + packed.num_blocks * packed.block_width
    for n, (prefix, blocks) in enumerate(expected):
        got = list(
            zip(
                packed.input_ids[n].tolist(),
                packed.position_ids[n].tolist(),
                packed.shift_labels[n].tolist(),
                packed.segment_ids[n].tolist(),
            )
        )
        assert got[: len(prefix)] == prefix
        assert all(seg == -1 and label == -100 for _, _, label, seg in got[len(prefix) : packed.prefix_width])
        for i, (row, block) in enumerate(blocks):
            start = packed.prefix_width + i * packed.block_width
            assert got[start : start + len(block)] == block
            assert all(seg == -1 for *_, seg in got[start + len(block) : start + packed.block_width])
            # stock completion position t of `row` reads the packed position predicting its token t
            for t in range(batch["completion_ids"].size(1)):
                scored = t < len(block) - 1
                assert packed.source_mask[row, t].item() == scored
                if scored:
                    assert packed.source_index[row, t].item() == n * packed.seq_len + start + t
    assert packed.source_mask.sum() == batch["completion_mask"].sum()


def test_position_ids_restart_after_the_prompt():
    # Unpadded prompt of 4 tokens: prompt 0..3, every completion 4, 5, ... (the last prompt token, 3, opens blocks)
    prompt_ids = torch.tensor([[1, 2, 3, 4]] * 3)
    completion_ids = torch.tensor([[5, 6, 7], [8, 9, 0], [7, 0, 0]])
    completion_mask = (completion_ids != 0).long()
    packed = pack_groups(prompt_ids, torch.ones_like(prompt_ids), completion_ids, completion_mask, [[0, 1, 2]])
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 0, 3, 4, 0, 0]
    assert packed.input_ids[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 4, 8, 9, 0, 4, 7, 0, 0]


def test_ungroup_is_a_gather_back_to_the_stock_layout():
    batch = make_batch(seed=2, rows="abab")
    groups = find_groups(batch["prompt_ids"], batch["prompt_mask"])
    packed = pack_groups(
        batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"], groups
    )
    # Scoring the labels returns the completion tokens where the mask is on, 0 elsewhere
    labels = ungroup(packed.shift_labels, packed)
    assert torch.equal(labels, batch["completion_ids"] * batch["completion_mask"])
    values = torch.randn(packed.input_ids.shape, requires_grad=True)
    ungroup(values, packed).sum().backward()
    assert values.grad.sum() == batch["completion_mask"].sum()


def test_pack_rejects_holes_and_empty_prompts():
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="left-padded"):
        pack_groups(ids, torch.tensor([[1, 0, 1]]), ids, torch.ones_like(ids), [[0]])
    with pytest.raises(ValueError, match="right-padded"):
        pack_groups(ids, torch.ones_like(ids), ids, torch.tensor([[1, 0, 1]]), [[0]])
    with pytest.raises(ValueError, match="empty prompt"):
        pack_groups(ids, torch.zeros_like(ids), ids, torch.ones_like(ids), [[0]])


def test_attention_allowed_matches_reference():
    segments = torch.tensor([[0, 0, -1, 1, 1, -1, 2, 2, 2], [0, 0, 0, 1, -1, -1, 2, 2, -1]])
    allowed = attention_allowed(segments)
    for n in range(2):
        seg = segments[n].tolist()
        for q in range(len(seg)):
            for k in range(len(seg)):
                if seg[q] == -1:
                    expected = q == k
                elif seg[k] == -1 or k > q:
                    expected = False
                else:
                    expected = seg[k] == 0 or seg[k] == seg[q]
                assert allowed[n, q, k].item() == expected, (n, q, k)


# ---------------------------------------------------------------------------------------------------------------
# Split attention


def dense_attention(query, key, value, allowed, scaling):
    rep = query.size(1) // key.size(1)
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    scores = (query @ key.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return (scores.softmax(-1) @ value).transpose(1, 2)


def packed_with_short_prompts(seed: int, one_token_prompt: bool):
    """Groups with prompts of different lengths (so the prefix area is padded); optionally one prompt of a single
    token, whose group has an empty prefix."""
    batch = make_batch(seed=seed, rows="aabacbcb")
    if one_token_prompt:
        rows = [0, 1, 3]  # group "a"
        batch["prompt_mask"][rows] = 0
        batch["prompt_mask"][rows, -1] = 1
    return pack_groups(
        batch["prompt_ids"],
        batch["prompt_mask"],
        batch["completion_ids"],
        batch["completion_mask"],
        find_groups(batch["prompt_ids"], batch["prompt_mask"]),
    )


ATTENTIONS = {
    "merged": lambda q, k, v, layout, **kw: split_attention(q, k, v, _with(layout, "merged"), **kw),
    "lower_right": lambda q, k, v, layout, **kw: split_attention(q, k, v, _with(layout, "lower_right"), **kw),
    "materialized": materialized_split_attention,
}


def _with(layout, kernel):
    layout.kernel = kernel
    return layout


@pytest.mark.parametrize("one_token_prompt", [False, True])
@pytest.mark.parametrize("attention", list(ATTENTIONS))
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_split_attention_matches_dense_masked_attention(heads, kv_heads, attention, one_token_prompt):
    packed = packed_with_short_prompts(3, one_token_prompt)
    layout = GroupedAttentionLayout.from_packed(packed)
    assert layout.prefix_key_padding is not None  # prompts of different lengths share the prefix area
    if one_token_prompt:
        assert packed.prefix_lengths.min() == 0
    gen = torch.Generator().manual_seed(0)
    n, length, dim = packed.num_rows, packed.seq_len, 8
    q = torch.randn(n, heads, length, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(n, kv_heads, length, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(n, kv_heads, length, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    real = (packed.segment_ids != -1)[:, :, None, None]  # padding queries are never read
    grad_out = torch.randn(n, length, heads, dim, generator=gen, dtype=torch.float64) * real

    out = ATTENTIONS[attention](q, k, v, layout, scaling=0.3)
    expected = dense_attention(q, k, v, attention_allowed(packed.segment_ids), 0.3)
    torch.testing.assert_close(out * real, expected * real, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", ["merged", "lower_right"])
def test_split_attention_without_padding_or_prefix(kernel):
    # Equal prompt lengths (no prefix padding), then prompts of one token each (no prefix area at all)
    for prompt_len in (3, 1):  # make_batch gives group "a" a 3-token prompt
        batch = make_batch(seed=8, rows="aaaa")
        batch["prompt_ids"], batch["prompt_mask"] = (
            batch["prompt_ids"][:, -prompt_len:],
            batch["prompt_mask"][:, -prompt_len:],
        )
        packed = pack_groups(
            batch["prompt_ids"],
            batch["prompt_mask"],
            batch["completion_ids"],
            batch["completion_mask"],
            [[0, 1, 2, 3]],
        )
        layout = GroupedAttentionLayout.from_packed(packed)
        layout.kernel = kernel
        assert layout.prefix_key_padding is None and layout.prefix_width == prompt_len - 1
        gen = torch.Generator().manual_seed(1)
        q, k, v = (
            torch.randn(1, 4, packed.seq_len, 8, generator=gen, dtype=torch.float64, requires_grad=True)
            for _ in range(3)
        )
        real = (packed.segment_ids != -1)[:, :, None, None]
        out = split_attention(q, k, v, layout)
        expected = dense_attention(q, k, v, attention_allowed(packed.segment_ids), 8**-0.5)
        torch.testing.assert_close(out * real, expected * real, rtol=1e-10, atol=1e-10)
        grads = torch.autograd.grad((out * real).sum(), (q, k, v))
        for got, want in zip(grads, torch.autograd.grad((expected * real).sum(), (q, k, v))):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_split_attention_never_materialises_scores():
    """Peak memory of the fused path stays O(tokens x width): far below one (G*R x P) score tensor."""

    prefix, block, blocks, heads, dim = 1024, 257, 8, 4, 16
    packed_len = prefix + blocks * block
    layout = GroupedAttentionLayout(prefix_width=prefix, block_width=block, num_blocks=blocks)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, packed_len, dim, generator=gen, requires_grad=True) for _ in range(3))
    score_bytes = heads * blocks * block * prefix * 4  # one fp32 score tensor of block queries x prefix keys

    peak = peak_backward_bytes

    def dense():  # one explicit score tensor of all block queries against the prefix keys
        return (q[:, :, prefix:] @ k[:, :, :prefix].transpose(-1, -2)).softmax(-1) @ v[:, :, :prefix]

    fused = peak(lambda: split_attention(q, k, v, layout))
    assert peak(dense) > score_bytes  # the measurement can see a score tensor when there is one
    assert fused < score_bytes / 4, (fused, score_bytes)
    # the materialised path (dropout, soft-capping) forms one block's scores at a time
    assert peak(lambda: materialized_split_attention(q, k, v, layout)) < score_bytes


def grouped_model(arch, attn):
    model = sharpen_(AutoModelForCausalLM.from_pretrained(model_path(arch), attn_implementation=attn)).eval()
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    return model


def packed_batch():
    batch = make_batch(seed=6, rows="aabacbcb")
    groups = find_groups(batch["prompt_ids"], batch["prompt_mask"])
    return pack_groups(
        batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"], groups
    )


def scored(model, packed, mask, **kwargs):
    with torch.no_grad():
        out = model(
            input_ids=packed.input_ids,
            attention_mask=mask,
            position_ids=packed.position_ids,
            shift_labels=packed.shift_labels,
            fused_lm_head=True,
            **kwargs,
        )
    return out.log_probs.masked_fill(packed.shift_labels == -100, 0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fast_path_matches_dense_reference_mask_in_the_model(arch, attn):
    packed = packed_batch()
    model = grouped_model(arch, attn)
    reference = scored(model, packed, dense_reference_mask(packed))  # stock attention, dense additive mask
    install_grouped_attention(model)
    layout = GroupedAttentionLayout.from_packed(packed)
    fast = scored(model, packed, packed.segment_ids[:, None, None, :], **{LAYOUT_KWARG: layout})
    assert layout.calls == model.config.num_hidden_layers
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    # The grouped implementations still run ordinary (dense-masked) forwards like the stock ones
    torch.testing.assert_close(scored(model, packed, dense_reference_mask(packed)), reference, rtol=0, atol=0)


def test_eager_with_a_boolean_4d_mask_is_silently_wrong():
    # Why the dense reference mask is additive: eager adds the mask to the scores
    packed = packed_batch()
    model = grouped_model("llama", "eager")
    additive = scored(model, packed, dense_reference_mask(packed))
    boolean = scored(model, packed, attention_allowed(packed.segment_ids)[:, None])
    assert (additive - boolean).abs().max() > 1e-2


def test_attending_to_siblings_would_be_detected():
    # Negative control: the comparisons above are sensitive to a sibling leak
    packed = packed_batch()
    model = grouped_model("llama", "sdpa")
    leaky = attention_allowed(packed.segment_ids.clamp(max=1))  # every block merged into one
    mask = torch.zeros(leaky.shape).masked_fill(~leaky, float("-inf"))[:, None]
    diff = (scored(model, packed, mask) - scored(model, packed, dense_reference_mask(packed))).abs().max()
    assert diff > 1e-2


def test_attention_dropout_takes_the_materialized_path(monkeypatch):
    import trl_ext.prefix_grouper.attention as attention

    calls = []
    real = attention.materialized_split_attention
    monkeypatch.setattr(attention, "materialized_split_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    packed = packed_with_short_prompts(3, False)
    layout = GroupedAttentionLayout.from_packed(packed)
    q = k = v = torch.randn(packed.num_rows, 2, packed.seq_len, 8)
    split_attention(q, k, v, layout)
    assert calls == []
    out = split_attention(q, k, v, layout, dropout=0.5)
    assert len(calls) == 1 and calls[0]["dropout"] == 0.5 and out.shape == (packed.num_rows, packed.seq_len, 2, 8)


@pytest.mark.parametrize("rows", ["aabacbcb", "a"])  # "a": one row, no padding anywhere
def test_positions_from_the_mask_and_the_largest_position_cell(rows):
    batch = make_batch(seed=3, rows=rows, max_completion=5)
    args = batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"]
    groups = find_groups(batch["prompt_ids"], batch["prompt_mask"])
    columns = pack_groups(*args, groups)
    # OPT's rule on the stock row, token by token: position = number of real tokens before it
    stock_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    from_mask = stock_mask.cumsum(1) - 1
    packed = pack_groups(*args, groups, count_padding=False)
    width = batch["prompt_ids"].size(1)
    for n, group in enumerate(groups):
        for i, row in enumerate(group):
            start = packed.prefix_width + i * packed.block_width
            length = int(packed.block_lengths[n, i])
            expected = from_mask[row, width - 1 : width - 1 + length]
            assert packed.position_ids[n, start : start + length].tolist() == expected.tolist()
        prefix_len = int(packed.prefix_lengths[n])
        assert packed.position_ids[n, :prefix_len].tolist() == list(range(prefix_len))
    assert torch.equal(packed.input_ids, columns.input_ids)
    # The largest stock position rides on exactly one padding cell; a row without padding gets a wider block slot
    top = width + batch["completion_ids"].size(1) - 1
    carried = pack_groups(*args, groups, max_position=top)
    cells = (carried.position_ids == top) & (carried.segment_ids == -1)
    assert int(cells.sum()) == 1 and int(carried.position_ids.max()) == top
    real = carried.segment_ids != -1
    padded = columns.segment_ids == -1
    if padded.any():
        assert carried.seq_len == columns.seq_len and torch.equal(
            carried.position_ids[real], columns.position_ids[real]
        )
    else:
        assert carried.block_width == columns.block_width + 1
