"""Slow, obvious Q-Tuning references in plain Python (lists, floats and exact fractions, loops, no tensor tricks)."""

from __future__ import annotations

import functools
import math
from fractions import Fraction


@functools.lru_cache(maxsize=64)
def _sorted_fractions(values: tuple) -> list:
    return sorted(Fraction(v) for v in values)


def quantile(values, q):
    """Linear interpolation between order statistics (numpy's default), in exact rational arithmetic."""
    xs = _sorted_fractions(tuple(values))
    pos = Fraction(q) * (len(xs) - 1)
    k = math.floor(pos)
    if k + 1 >= len(xs):
        return xs[-1]
    return xs[k] + (pos - k) * (xs[k + 1] - xs[k])


def sample_stats(nll, entropy, sample_ids):
    """Per-sample PPL = exp(mean NLL) and mean entropy; nested lists in, dict sample -> (ppl, ent, n) out."""
    sums = {}
    for row_nll, row_ent, row_ids in zip(nll, entropy, sample_ids):
        for x, h, s in zip(row_nll, row_ent, row_ids):
            if s < 0:
                continue
            a, b, n = sums.get(s, (0.0, 0.0, 0))
            sums[s] = (a + x, b + h, n + 1)
    return {s: (math.exp(a / n), b / n, n) for s, (a, b, n) in sums.items()}


def quadrants_at(ppl, ent, a):
    """The spec's quadrant of each sample at the shared ratio ``a`` (before filling): 1..4, or 0 in between."""
    p_lo, p_hi = quantile(ppl, a), quantile(ppl, 1 - Fraction(a))
    e_lo, e_hi = quantile(ent, a), quantile(ent, 1 - Fraction(a))
    quad = []
    for p, e in zip(ppl, ent):
        if p > p_hi and e <= e_lo:
            quad.append(2)
        elif p <= p_lo and e > e_hi:
            quad.append(4)
        elif p > p_hi and e > e_hi:
            quad.append(1)
        elif p <= p_lo and e <= e_lo:
            quad.append(3)
        else:
            quad.append(0)
    return quad


def candidate_ratios(n):
    """Every ratio in [0, 1/2] that can matter, ascending.

    A sample's quadrant only changes where a threshold Q_a or Q_{1-a} reaches an observed score. With linear
    interpolation, the quantile at q = i/(n-1) is the i-th smallest score, and between two such q it moves
    strictly between two neighbouring scores. So the candidates are every a with a = i/(n-1) or 1 - a = i/(n-1),
    one a inside each gap between them, and 1/2.
    """
    if n == 1:
        return [Fraction(0), Fraction(1, 2)]
    points = {Fraction(i, n - 1) for i in range(n)} | {1 - Fraction(i, n - 1) for i in range(n)}
    points = sorted(a for a in points | {Fraction(1, 2)} if a <= Fraction(1, 2))
    gaps = [(x + y) / 2 for x, y in zip(points, points[1:])]
    return sorted(points + gaps)


def assign(ppl, ent, ratio):
    """Brute force: the largest candidate ratio a keeping at most k samples in Q2 or Q4, then the fill rule.

    Returns ``(quadrants, a, num_filled)``, ``a`` as a Fraction.
    """
    n = len(ppl)
    k = min(n, max(1, math.floor(ratio * n + 0.5)))
    a = max(a for a in candidate_ratios(n) if sum(q in (2, 4) for q in quadrants_at(ppl, ent, a)) <= k)
    quad = quadrants_at(ppl, ent, a)

    def norm(xs):
        lo_, hi_ = min(xs), max(xs)
        return [(x - lo_) / (hi_ - lo_) if hi_ > lo_ else 0.0 for x in xs]

    pn, en = norm(ppl), norm(ent)
    num_filled = 0
    while sum(q in (2, 4) for q in quad) < k:
        best, best_gap = None, None
        for i in range(n):  # strictly larger gap wins, so ties keep the lowest index
            if quad[i] in (2, 4):
                continue
            gap = max(pn[i] - en[i], en[i] - pn[i])
            if best is None or gap > best_gap:
                best, best_gap = i, gap
        quad[best] = 2 if pn[best] > en[best] else 4
        num_filled += 1
    return quad, a, num_filled


def token_scores(token_ppl, sample_ids, lam):
    out = []
    for row_p, row_s in zip(token_ppl, sample_ids):
        row = []
        for i, (p, s) in enumerate(zip(row_p, row_s)):
            if s < 0:
                row.append(0.0)
                continue
            left = row_p[i - 1] if i > 0 and row_s[i - 1] == s else p
            right = row_p[i + 1] if i + 1 < len(row_p) and row_s[i + 1] == s else p
            row.append((1 - lam) * p + lam * (left + right))
        out.append(row)
    return out


def token_keep(scores, sample_ids, quad, r_s, r_t):
    """Drop the highest-scoring Q2 token (first in row-major order on ties) while kept > budget."""
    cells = [(r, c) for r, row in enumerate(sample_ids) for c, s in enumerate(row) if s >= 0]
    budget = max(1, math.floor(len(cells) * r_s * r_t + 0.5))
    keep = {(r, c): quad[sample_ids[r][c]] in (2, 4) for r, c in cells}
    while sum(keep.values()) > budget:
        best = None
        for r, c in cells:
            if (
                keep[(r, c)]
                and quad[sample_ids[r][c]] == 2
                and (best is None or scores[r][c] > scores[best[0]][best[1]])
            ):
                best = (r, c)
        if best is None:
            break
        keep[best] = False
    return [[keep.get((r, c), False) for c in range(len(row))] for r, row in enumerate(sample_ids)]


def select_from_logits(logits, labels, r_s, r_t, lam):
    """The whole selection for a padded batch: ``(nll, quadrants, a, filled, keep)``.

    ``logits`` (rows, T, V) predict ``labels`` (rows, T, -100 where not trained), already shifted. One sample per
    row, numbered in row order among the rows that have response tokens. ``keep`` is a bool tensor like ``labels``.
    """
    import torch

    logp = logits.double().log_softmax(-1)
    nll = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    ent = -(logp.exp() * logp).sum(-1)
    rows_with_labels = [r for r in range(labels.size(0)) if (labels[r] != -100).any()]
    sample_ids = [
        [rows_with_labels.index(r) if labels[r, t] != -100 else -1 for t in range(labels.size(1))]
        for r in range(labels.size(0))
    ]
    stats = sample_stats(nll.tolist(), ent.tolist(), sample_ids)
    ppl = [stats[s][0] for s in range(len(stats))]
    mean_ent = [stats[s][1] for s in range(len(stats))]
    quad, a, filled = assign(ppl, mean_ent, r_s)
    scores = token_scores([[math.exp(x) for x in row] for row in nll.tolist()], sample_ids, lam)
    keep = torch.tensor(token_keep(scores, sample_ids, quad, r_s, r_t))
    return nll, quad, a, filled, keep
