"""The packing of preference rows (``trl_ext.prefix_sharing.pairs``) and the sharing rule, against slow loops over
the stock rows."""

import pytest
import torch

from trl_ext.prefix_grouper.layout import attention_allowed
from trl_ext.prefix_sharing.forward import SharingRule
from trl_ext.prefix_sharing.pairs import is_right_padded, pack_pairs, unpack


def dpo_batch(prompts, chosen, rejected):
    """Stock DPO rows: [prompt; chosen] for every pair, then [prompt; rejected], right-padded, labels on completions."""
    rows = [(p, c) for p, c in zip(prompts, chosen)] + [(p, r) for p, r in zip(prompts, rejected)]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, (p, c) in enumerate(rows):
        ids[b, : len(p) + len(c)] = torch.tensor(p + c)
        mask[b, : len(p) + len(c)] = 1
        labels[b, len(p) : len(p) + len(c)] = torch.tensor(c)
    return ids, mask, labels


def random_pairs(seed, n=3):
    gen = torch.Generator().manual_seed(seed)

    def tokens(low, high):
        return torch.randint(10, 99, (int(torch.randint(low, high, (1,), generator=gen)),), generator=gen).tolist()

    prompts = [tokens(1, 9) for _ in range(n)]
    return prompts, [tokens(1, 6) for _ in range(n)], [tokens(1, 6) for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_every_label_lands_at_its_stock_position_with_its_stock_position_id(seed):
    ids, mask, labels = dpo_batch(*random_pairs(seed))
    pairs = pack_pairs(ids, mask, labels)
    expected = labels[:, 1:].clamp(min=0)
    assert torch.equal(unpack(pairs.packed.shift_labels.clamp(min=0), pairs), expected)
    # the token that predicts stock token t + 1 sits at stock position t, and carries that position id
    positions = torch.arange(ids.size(1) - 1).expand(ids.size(0), -1).masked_fill(labels[:, 1:] == -100, 0)
    assert torch.equal(unpack(pairs.packed.position_ids, pairs), positions)
    # and sees exactly its stock context: the packed ids it attends to are the stock row's first t + 1 tokens
    allowed = attention_allowed(pairs.packed.segment_ids)
    for b in range(ids.size(0)):
        for t in labels[b, 1:].ne(-100).nonzero().flatten().tolist():
            flat = pairs.target_index[b].tolist().index(t)
            source = pairs.packed.source_index[b, flat].item()
            n, q = divmod(source, pairs.packed.seq_len)
            seen = pairs.packed.input_ids[n][allowed[n, q]]
            order = pairs.packed.position_ids[n][allowed[n, q]].argsort()
            assert seen[order].tolist() == ids[b, : t + 1].tolist()


def test_chosen_and_rejected_of_a_prompt_share_one_row_even_across_pairs():
    ids, mask, labels = dpo_batch([[5, 6, 7], [8, 9], [5, 6, 7]], [[1], [2, 3], [4]], [[11, 12], [13], [14]])
    pairs = pack_pairs(ids, mask, labels)
    assert pairs.groups == [[0, 2, 3, 5], [1, 4]]
    assert pairs.shared_rows == 6 and pairs.packed.num_rows == 2
    assert pairs.prompt_tokens == 16 and pairs.completion_tokens == 8


def test_prompts_cut_differently_keep_rows_of_their_own():
    # keep_end truncation of [prompt; chosen] and [prompt; rejected] keeps different prompt suffixes
    ids, mask, labels = dpo_batch([[6, 7]], [[1, 2, 3]], [[4]])
    ids[1, :3], labels[1, :3] = torch.tensor([5, 6, 7]), -100
    mask[1, :4] = 1
    ids[1, 3], labels[1, 3] = 4, 4
    pairs = pack_pairs(ids, mask, labels)
    assert pairs.groups == [[0], [1]] and pairs.shared_rows == 0
    assert not SharingRule().packs(pairs)  # nothing shared: the stock forward runs


def test_rows_without_labels_and_a_completion_from_the_first_token():
    ids, mask, labels = dpo_batch([[5, 6], [7]], [[1, 2], []], [[3], []])
    labels[0, 0] = 5  # a label on the first token is never scored (no token predicts it)
    pairs = pack_pairs(ids, mask, labels)
    assert torch.equal(unpack(pairs.packed.shift_labels.clamp(min=0), pairs), labels[:, 1:].clamp(min=0))


def test_holes_in_the_labels_stay_unscored():
    ids, mask, labels = dpo_batch([[5, 6]], [[1, 2, 3]], [[4, 4]])
    labels[0, 3] = -100
    values = unpack(torch.ones(pack_pairs(ids, mask, labels).packed.input_ids.shape), pack_pairs(ids, mask, labels))
    assert torch.equal(values, (labels[:, 1:] != -100).float())


def test_refuses_rows_that_are_not_right_padded():
    ids, mask, labels = dpo_batch([[5, 6]], [[1]], [[2, 3]])
    assert is_right_padded(mask) and not is_right_padded(mask.flip(1))
    with pytest.raises(ValueError, match="right-padded"):
        pack_pairs(ids, mask.flip(1), labels)
    with pytest.raises(ValueError, match="same"):
        pack_pairs(ids, mask, labels[:, 1:])


def test_rule_packs_from_the_prompt_ratio():
    ids, mask, labels = dpo_batch([[5, 6, 7, 8]], [[1, 2]], [[3, 4]])  # 8 prompt tokens, 4 completion tokens
    pairs = pack_pairs(ids, mask, labels)
    assert SharingRule(min_prompt_ratio=2.0).packs(pairs)
    assert not SharingRule(min_prompt_ratio=2.01).packs(pairs)
    assert SharingRule(min_prompt_ratio=100.0, force="shared").packs(pairs)
    assert not SharingRule(force="stock").packs(pairs)
