r"""Q-Tuning scoring: the Error-Uncertainty (EU) plane, sample selection and token pruning.

Pure functions over tensors, no trainer or config objects. Tokens are given in the shifted
("next-token label") layout the fused LM head returns: ``(rows, seq_len - 1)`` tensors where
position ``t`` scores the label ``labels[:, t + 1]``. ``sample_ids`` has that shape too and holds,
for every response (label) token, the index of the sample it belongs to, and ``-1`` elsewhere
(prompt, padding, document separators). One row can hold several samples (packed or
padding-free batches).

The procedure (paper: "Winning the Pruning Gamble", arXiv 2509.23873) per mini-batch:

1. error and uncertainty of each sample (:func:`sample_ppl_entropy`):
   :math:`\mathrm{PPL} = \exp(\frac{1}{|y|}\sum_i \mathrm{NLL}_i)` and the mean predictive entropy;
2. the EU plane with one shared quantile ratio ``a`` found by an exact bisection (:func:`assign_quadrants`);
3. token scores of the kept "misconception" (Q2) samples (:func:`token_scores`),
   :math:`s_i = (1-\lambda)\,\mathrm{PPL}_i + \lambda\,(\mathrm{PPL}_{i-1} + \mathrm{PPL}_{i+1})`;
4. a batch token budget met by dropping the highest-scoring Q2 tokens (:func:`token_keep_mask`).

Example:
    ```py
    >>> import torch
    >>> from trl_ext.qtuning.scoring import sample_ppl_entropy, assign_quadrants, token_scores, token_keep_mask
    >>> nll = torch.rand(4, 6)
    >>> entropy = torch.rand(4, 6)
    >>> sample_ids = torch.arange(4)[:, None].expand(4, 6)
    >>> ppl, ent, _ = sample_ppl_entropy(nll, entropy, sample_ids, num_samples=4)
    >>> sel = assign_quadrants(ppl, ent, sample_keep_ratio=0.5)
    >>> scores = token_scores(nll.exp(), sample_ids, neighbor_lambda=0.5)
    >>> keep = token_keep_mask(scores, sample_ids, sel.quadrant, sel.keep, 0.5, 0.5)
    ```
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (``round_half_up(2.5) == 3``; Python's ``round`` gives 2)."""
    return int(math.floor(x + 0.5))


def token_nll_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Per-token negative log-likelihood and predictive entropy from full logits, in the shifted layout.

    For a model without TRL's fused LM head. Returns ``(nll, entropy, label_mask)``, each of shape
    ``(rows, seq_len - 1)``: position ``t`` is the prediction of ``labels[:, t + 1]`` from ``logits[:, t]``;
    ``nll`` and ``entropy`` are zero where the label is ``-100``. The entropy is
    :math:`H_t = -\sum_v p_{t,v}\log p_{t,v}`.

    Example:
        ```py
        >>> nll, entropy, mask = token_nll_entropy(torch.randn(2, 5, 11), torch.tensor([[-100, 1, 2, 3, -100]] * 2))
        >>> nll.shape
        torch.Size([2, 4])
        ```
    """
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    mask = labels != -100
    logp = logits.log_softmax(-1)
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return nll.masked_fill(~mask, 0.0), entropy.masked_fill(~mask, 0.0), mask


def sample_ppl_entropy(
    nll: torch.Tensor, entropy: torch.Tensor, sample_ids: torch.Tensor, num_samples: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Error and uncertainty of each sample: perplexity and mean predictive entropy over its response tokens.

    :math:`\mathrm{PPL}_j = \exp\big(\frac{1}{n_j}\sum_{i \in j}\mathrm{NLL}_i\big)` and
    :math:`\bar H_j = \frac{1}{n_j}\sum_{i \in j} H_i`, both over the ``n_j`` label tokens of sample ``j``
    (``sample_ids == j``). The entropy is averaged over the same response tokens as the perplexity
    (the published code averaged over every attended position, prompt included); this keeps both
    axes about what the sample trains and is what TRL's fused LM head computes.

    Args:
        nll, entropy: ``(rows, T)`` per-token values (any value where ``sample_ids == -1``).
        sample_ids: ``(rows, T)`` sample index of each response token, ``-1`` elsewhere.
        num_samples: number of samples; every index in ``[0, num_samples)`` must own a token.

    Returns:
        ``(ppl, mean_entropy, num_tokens)``, each of shape ``(num_samples,)`` (float64, float64, int64).
    """
    ids = sample_ids.reshape(-1)
    valid = ids >= 0
    ids = ids[valid]
    counts = torch.bincount(ids, minlength=num_samples)
    if counts.numel() != num_samples or bool((counts == 0).any()):
        raise ValueError(
            f"sample_ids must number the samples 0..{num_samples - 1} with at least one response token each; got "
            f"token counts {counts.tolist()}. Build them with trl_ext.qtuning.batch.sample_ids_from_batch."
        )
    nll_sum = torch.zeros(num_samples, dtype=torch.float64, device=nll.device)
    ent_sum = torch.zeros(num_samples, dtype=torch.float64, device=nll.device)
    nll_sum.index_add_(0, ids, nll.reshape(-1)[valid].double())
    ent_sum.index_add_(0, ids, entropy.reshape(-1)[valid].double())
    return (nll_sum / counts).exp(), ent_sum / counts, counts


@dataclass
class QuadrantAssignment:
    """Result of :func:`assign_quadrants` for one batch of ``B`` samples.

    Attributes:
        quadrant: ``(B,)`` int64. 1 = high PPL & high entropy (noise, dropped), 2 = high PPL & low entropy
            (misconception, kept and token-pruned), 3 = low & low (redundant, dropped), 4 = low PPL &
            high entropy (calibration, kept whole), 0 = between the thresholds (dropped). Fillers are 2 or 4.
        keep: ``(B,)`` bool, the kept samples (quadrants 2 and 4).
        a: the shared quantile ratio found by bisection.
        ppl_low, ppl_high, ent_low, ent_high: the thresholds ``Q_a`` and ``Q_{1-a}`` of PPL and entropy.
        num_filled: how many kept samples came from the fill rule.
        iterations: kept-count evaluations the bisection used (about ``log2(B) + 1``).
    """

    quadrant: torch.Tensor
    keep: torch.Tensor
    a: float
    ppl_low: float
    ppl_high: float
    ent_low: float
    ent_high: float
    num_filled: int
    iterations: int


def _grid_regions(ppl, ent, sorted_ppl, sorted_ent, c: int):
    # The regions at a = c / (2(B-1)), from order statistics s_0 <= ... <= s_{B-1} of each score. At even c = 2j,
    # Q_a = s_j and Q_{1-a} = s_{B-1-j}. At odd c = 2j + 1 both quantiles lie strictly between neighbouring order
    # statistics (or on a tie), so for the observed scores "x <= Q_a" is "x <= s_j" and "x > Q_{1-a}" is
    # "x > s_{B-2-j}". Comparing with order statistics keeps the breakpoints exact, where an interpolated quantile
    # can round to one side of a tied value.
    low, high = c // 2, ppl.numel() - 1 - (c + 1) // 2
    ppl_high, ent_high = ppl > sorted_ppl[high], ent > sorted_ent[high]
    ppl_low, ent_low = ppl <= sorted_ppl[low], ent <= sorted_ent[low]
    return ppl_high & ent_low, ppl_low & ent_high, ppl_high & ent_high, ppl_low & ent_low


def _grid_quantiles(sorted_x: torch.Tensor, c: int) -> tuple[float, float]:
    # (Q_a, Q_{1-a}) at a = c / (2(B-1)) by linear interpolation: positions c/2 and B-1-c/2 in the sorted scores.
    last = sorted_x.numel() - 1

    def at(pos2: int) -> float:  # the quantile at position pos2 / 2
        k = pos2 // 2
        if pos2 % 2 == 0 or k + 1 > last:
            return sorted_x[k].item()
        return (sorted_x[k] + 0.5 * (sorted_x[k + 1] - sorted_x[k])).item()

    return at(c), at(2 * last - c)


def _min_max(x: torch.Tensor) -> torch.Tensor:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


def assign_quadrants(ppl: torch.Tensor, entropy: torch.Tensor, sample_keep_ratio: float) -> QuadrantAssignment:
    r"""Place each sample on the Error-Uncertainty plane and keep ``round(r_sample * B)`` of them.

    With one shared ratio ``a`` and the batch quantiles ``Q_a`` (linear interpolation between order statistics,
    numpy's default):

    - Q2 (misconception, kept): :math:`\mathrm{PPL} > Q_{1-a}(\mathrm{PPL})` and :math:`H \le Q_a(H)`;
    - Q4 (calibration, kept): :math:`\mathrm{PPL} \le Q_a(\mathrm{PPL})` and :math:`H > Q_{1-a}(H)`;
    - Q1 (noise, dropped): :math:`\mathrm{PPL} > Q_{1-a}(\mathrm{PPL})` and :math:`H > Q_{1-a}(H)`;
    - Q3 (redundant, dropped): :math:`\mathrm{PPL} \le Q_a(\mathrm{PPL})` and :math:`H \le Q_a(H)`.

    ``a`` is the largest ratio in ``[0, 1/2]`` whose kept count :math:`|Q2| + |Q4|` does not exceed the target
    ``k = round_half_up(r_sample * B)`` (at least 1). The paper finds it by bisection on ``a`` with tolerance 0.01,
    which can stop short of it (on either side of a breakpoint it does not land on, or past breakpoints closer
    together than the tolerance) and then fill. Here the bisection is exact: the
    regions grow with ``a`` and change only where a quantile reaches an order statistic, at ``a = j / (B - 1)``,
    so it runs over the grid ``a = c / (2(B - 1))``, ``c = 0 .. B - 1`` (those breakpoints and one ratio between
    each two), in about ``log2(B)`` steps; ``a = 1/2`` when it qualifies at most ``k``, and ``a = 1/2`` for
    ``B = 1``. If fewer than ``k`` qualify, the rest is filled with the unselected samples of largest
    :math:`\max(p_n - h_n, h_n - p_n)`, where :math:`p_n, h_n` are min-max normalised over the batch
    (0 when all values are equal); ties go to the lower index. A filler with :math:`p_n > h_n` counts as
    Q2, otherwise (PPL side not larger, ties included) as Q4. Exactly ``k`` samples are kept.

    Example:
        ```py
        >>> sel = assign_quadrants(torch.tensor([9.0, 1.0, 5.0, 2.0]), torch.tensor([0.1, 3.0, 2.0, 0.2]), 0.5)
        >>> sel.quadrant.tolist(), sel.keep.tolist()
        ([2, 4, 1, 3], [True, True, False, False])
        ```
    """
    if ppl.ndim != 1 or ppl.shape != entropy.shape or ppl.numel() == 0:
        raise ValueError(
            f"ppl and entropy must be non-empty 1-D tensors of the same length; got shapes {tuple(ppl.shape)} and "
            f"{tuple(entropy.shape)}."
        )
    if not 0.0 < sample_keep_ratio <= 1.0:
        raise ValueError(f"sample_keep_ratio={sample_keep_ratio} is outside (0, 1]; e.g. use 0.25 to keep a quarter.")
    ppl, entropy = ppl.double(), entropy.double()
    if not bool(torch.isfinite(ppl).all() and torch.isfinite(entropy).all()):
        raise ValueError(
            f"Q-Tuning got non-finite sample scores (perplexity {ppl.tolist()}, entropy {entropy.tolist()}), so it "
            "cannot rank the samples. The model's outputs overflowed or training diverged: lower the learning rate, "
            "or train in float32/bfloat16 rather than float16."
        )
    num = ppl.numel()
    target = min(num, max(1, round_half_up(sample_keep_ratio * num)))
    sorted_ppl, sorted_ent = ppl.sort().values, entropy.sort().values

    def count(c):
        q2, q4 = _grid_regions(ppl, entropy, sorted_ppl, sorted_ent, c)[:2]
        return int(q2.sum() + q4.sum())

    # Largest grid index c with count(c) <= target; count(0) = 0, since nothing exceeds the maximum.
    lo, hi, iterations = 0, num - 1, 1
    if count(hi) <= target:
        lo = hi
    else:  # invariant: count(lo) <= target < count(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            iterations += 1
            if count(mid) <= target:
                lo = mid
            else:
                hi = mid
    c = lo
    a = c / (2 * (num - 1)) if num > 1 else 0.5
    q2, q4, q1, q3 = _grid_regions(ppl, entropy, sorted_ppl, sorted_ent, c)
    ppl_low, ppl_high = _grid_quantiles(sorted_ppl, c)
    ent_low, ent_high = _grid_quantiles(sorted_ent, c)
    quadrant = torch.zeros(num, dtype=torch.long, device=ppl.device)
    quadrant[q1] = 1
    quadrant[q3] = 3
    quadrant[q2] = 2
    quadrant[q4] = 4

    num_filled = target - int(q2.sum() + q4.sum())
    if num_filled > 0:
        p_n, h_n = _min_max(ppl), _min_max(entropy)
        gap = (p_n - h_n).abs().masked_fill(q2 | q4, -1.0)
        # Stable sort: equal gaps keep index order, so ties go to the lower index.
        fillers = torch.sort(gap, descending=True, stable=True).indices[:num_filled]
        quadrant[fillers] = torch.where(p_n[fillers] > h_n[fillers], 2, 4)
    return QuadrantAssignment(
        quadrant=quadrant,
        keep=(quadrant == 2) | (quadrant == 4),
        a=a,
        ppl_low=ppl_low,
        ppl_high=ppl_high,
        ent_low=ent_low,
        ent_high=ent_high,
        num_filled=max(num_filled, 0),
        iterations=iterations,
    )


def token_scores(token_ppl: torch.Tensor, sample_ids: torch.Tensor, neighbor_lambda: float = 0.5) -> torch.Tensor:
    r"""Neighbour-smoothed token scores :math:`s_i = (1-\lambda)\,\mathrm{PPL}_i + \lambda\,(\mathrm{PPL}_{i-1} + \mathrm{PPL}_{i+1})`.

    ``token_ppl`` is :math:`\exp(\mathrm{NLL}_i)` per token, ``(rows, T)``. The neighbours of token ``i`` are the
    positions ``i - 1`` and ``i + 1`` of the same row when they are response tokens of the same sample. A
    missing neighbour (the first or last response token, a gap, a one-token response) takes the token's
    own perplexity, so a token is neither favoured nor penalised for sitting at an edge. Scores are 0
    where ``sample_ids == -1``.
    """
    ppl = token_ppl.double()
    valid = sample_ids >= 0
    left = torch.roll(ppl, 1, dims=1)
    right = torch.roll(ppl, -1, dims=1)
    has_left = torch.zeros_like(valid)
    has_right = torch.zeros_like(valid)
    has_left[:, 1:] = valid[:, 1:] & (sample_ids[:, 1:] == sample_ids[:, :-1])
    has_right[:, :-1] = valid[:, :-1] & (sample_ids[:, :-1] == sample_ids[:, 1:])
    left = torch.where(has_left, left, ppl)
    right = torch.where(has_right, right, ppl)
    scores = (1 - neighbor_lambda) * ppl + neighbor_lambda * (left + right)
    return scores.masked_fill(~valid, 0.0)


def token_budget(num_response_tokens: int, sample_keep_ratio: float, token_keep_ratio: float) -> int:
    """Response tokens a batch keeps: ``round_half_up(total * r_sample * r_token)``, at least 1."""
    return max(1, round_half_up(num_response_tokens * sample_keep_ratio * token_keep_ratio))


def token_keep_mask(
    scores: torch.Tensor,
    sample_ids: torch.Tensor,
    quadrant: torch.Tensor,
    keep: torch.Tensor,
    sample_keep_ratio: float,
    token_keep_ratio: float,
) -> torch.Tensor:
    """Which response tokens get loss: the tokens of kept samples, minus the highest-scoring Q2 tokens.

    ``total_tokens`` is the number of response tokens of the whole batch (dropped samples included), and
    the budget is :func:`token_budget` of it. Starting from every token of the kept samples, the
    highest-scoring tokens of Q2 samples are dropped, across the batch, until the budget is met or no Q2
    token is left (Q4 samples are never token-pruned, so the budget is not met when Q4 alone exceeds it).
    Equal scores drop the earlier token (row-major order) first.

    Returns:
        ``(rows, T)`` bool mask, False outside response tokens.
    """
    valid = sample_ids >= 0
    safe_ids = sample_ids.clamp(min=0)
    kept = valid & keep[safe_ids]
    prunable = valid & (quadrant[safe_ids] == 2)
    budget = token_budget(int(valid.sum()), sample_keep_ratio, token_keep_ratio)
    num_drop = min(max(int(kept.sum()) - budget, 0), int(prunable.sum()))
    if num_drop == 0:
        return kept
    flat = scores.reshape(-1).double().masked_fill(~prunable.reshape(-1), -math.inf)
    drop = torch.sort(flat, descending=True, stable=True).indices[:num_drop]
    kept = kept.reshape(-1).clone()
    kept[drop] = False
    return kept.view_as(valid)
