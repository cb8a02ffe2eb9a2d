"""The cost model: hand-counted cases (the repeated last prompt token included) and its limits."""

import pytest

from trl_ext.prefix_grouper.cost import ideal_speedup

UNIT = dict(hidden_size=1, num_layers=1, intermediate_size=1, kv_size=1, vocab_size=1)


def test_hand_counted_case():
    # per row 2*(2+2+3) + 2 = 16 FLOPs, per pair 4; P=2, R=1, G=2.
    # Stock: 2 rows of [p0 p1 r] = 6 token rows, 2 * 9/2 causal pairs.
    stock = 2 * 3 * 16 + 2 * 9 / 2 * 4  # 132
    # Grouped: [p0 | p1 r | p1 r] = 5 token rows; pairs: prefix 1/2, each block of 2 sees 1 prefix key + 2/2 own
    grouped = 5 * 16 + (1 / 2 + 2 * 2 * (1 + 1)) * 4  # 114
    assert ideal_speedup(2, 1, 2, **UNIT) == pytest.approx(stock / grouped)


def test_attention_width_weighs_pairs_and_projections():
    # a = 3: per row 2*(2*3 + 2 + 3) + 2 = 24, per pair 12
    stock = 2 * 3 * 24 + 2 * 9 / 2 * 12
    grouped = 5 * 24 + (1 / 2 + 2 * 2 * (1 + 1)) * 12
    assert ideal_speedup(2, 1, 2, **UNIT, attention_size=3) == pytest.approx(stock / grouped)


@pytest.mark.parametrize("group", [4, 8, 16])
def test_long_prompt_limit_is_group_size(group):
    assert ideal_speedup(100_000, 1, group, **UNIT) == pytest.approx(group, rel=1e-3)


@pytest.mark.parametrize("prompt_len,completion_len", [(512, 64), (3, 100), (1, 7)])
def test_single_completion_gains_nothing(prompt_len, completion_len):
    assert ideal_speedup(prompt_len, completion_len, 1, **UNIT) == pytest.approx(1.0)
