"""The cost model of Prefix Grouper, as a pure function.

Per group of G completions of length R after a P-token prompt (attention counted causally):
the stock forward runs ``G*(P+R)`` token rows of linear work and ``G*(P+R)^2/2`` attention
pairs; the grouped forward runs ``P + G*R`` rows and ``P^2/2 + G*R*(P + R/2)`` pairs. For
``P >> R`` the ratio tends to G.
"""

from __future__ import annotations


def ideal_speedup(
    prompt_len: int,
    completion_len: int,
    group: int,
    hidden_size: int,
    num_layers: int,
    intermediate_size: int,
    kv_size: int,
    vocab_size: int,
) -> float:
    """Stock / grouped FLOPs of a log-prob forward for one group, from the cost model above.

    Linear work per token row: the attention projections (q, o: ``d*d`` each; k, v: ``d*kv_size``
    each), a gated MLP (``3*d*intermediate``) per layer, and the LM head (``d*vocab``), at 2 FLOPs
    per multiply-add. Attention costs ``4*d`` FLOPs per pair per layer (scores and values).

    Example:
        ```py
        >>> round(ideal_speedup(1024, 64, 8, hidden_size=256, num_layers=4, intermediate_size=1024,
        ...                     kv_size=256, vocab_size=101), 2)
        5.36
        ```
    """
    d = hidden_size
    per_row = num_layers * 2 * (2 * d * d + 2 * d * kv_size + 3 * d * intermediate_size) + 2 * d * vocab_size
    per_pair = num_layers * 4 * d
    p, r, g = prompt_len, completion_len, group
    stock = g * (p + r) * per_row + g * (p + r) ** 2 / 2 * per_pair
    grouped = (p + g * r) * per_row + (p**2 / 2 + g * r * (p + r / 2)) * per_pair
    return stock / grouped
