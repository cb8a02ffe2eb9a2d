"""The cost model of Prefix Grouper, as a pure function.

Per group of G completions of length R after a P-token prompt (attention counted causally):
the stock forward runs ``G*(P+R)`` token rows of linear work and ``G*(P+R)^2/2`` attention
pairs. The packed row holds the prefix (the prompt minus its last token, ``P-1`` rows) and G
blocks, each opened by a copy of the last prompt token (``R+1`` rows each), so the grouped
forward runs ``(P-1) + G*(R+1)`` rows and ``(P-1)^2/2 + G*(R+1)*((P-1) + (R+1)/2)`` pairs.
For ``P >> R`` the ratio tends to G; for ``G = 1`` it is exactly 1.
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
    attention_size: int | None = None,
) -> float:
    """Stock / grouped FLOPs of a log-prob forward for one group, from the cost model above.

    Linear work per token row: the attention projections (q and o: ``d*a`` each, where ``a`` is
    ``attention_size = heads * head_dim``; k and v: ``d*kv_size`` each), a gated MLP
    (``3*d*intermediate``) per layer, and the LM head (``d*vocab``), at 2 FLOPs per multiply-add.
    Attention costs ``4*a`` FLOPs per query-key pair per layer (scores and values).

    Args:
        attention_size (`int`, *optional*): ``num_attention_heads * head_dim``; defaults to ``hidden_size``.

    Example:
        ```py
        >>> round(ideal_speedup(1024, 64, 8, hidden_size=256, num_layers=4, intermediate_size=1024,
        ...                     kv_size=256, vocab_size=101), 2)
        5.33
        ```
    """
    d = hidden_size
    a = hidden_size if attention_size is None else attention_size
    per_row = num_layers * 2 * (2 * d * a + 2 * d * kv_size + 3 * d * intermediate_size) + 2 * d * vocab_size
    per_pair = num_layers * 4 * a
    p, r, g = prompt_len, completion_len, group
    stock = g * (p + r) * per_row + g * (p + r) ** 2 / 2 * per_pair
    prefix, block = p - 1, r + 1
    grouped = (prefix + g * block) * per_row + (prefix**2 / 2 + g * block * (prefix + block / 2)) * per_pair
    return stock / grouped
