"""The cost model: a hand-counted case and the P >> R limit."""

import pytest

from trl_ext.prefix_grouper.cost import ideal_speedup

UNIT = dict(hidden_size=1, num_layers=1, intermediate_size=1, kv_size=1, vocab_size=1)


def test_hand_counted_case():
    # per row 2*(2+2+3) + 2 = 16 FLOPs, per pair 4; P=2, R=1, G=2
    stock = 2 * 3 * 16 + 2 * 9 / 2 * 4  # 132
    grouped = (2 + 2) * 16 + (4 / 2 + 2 * 1 * (2 + 0.5)) * 4  # 92
    assert ideal_speedup(2, 1, 2, **UNIT) == pytest.approx(stock / grouped)


@pytest.mark.parametrize("group", [4, 8, 16])
def test_long_prompt_limit_is_group_size(group):
    assert ideal_speedup(100_000, 1, group, **UNIT) == pytest.approx(group, rel=1e-3)


def test_single_completion_gains_nothing():
    assert ideal_speedup(512, 64, 1, **UNIT) == pytest.approx(1.0)
