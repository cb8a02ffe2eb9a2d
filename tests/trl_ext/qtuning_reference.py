"""Slow, obvious Q-Tuning references in plain Python (lists and floats, loops, no tensor tricks)."""

from __future__ import annotations

import math


def quantile(values, q):
    """Linear interpolation between order statistics (numpy's default)."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
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


def regions(ppl, ent, a):
    p_lo, p_hi = quantile(ppl, a), quantile(ppl, 1 - a)
    e_lo, e_hi = quantile(ent, a), quantile(ent, 1 - a)
    q2 = [p > p_hi and e <= e_lo for p, e in zip(ppl, ent)]
    q4 = [p <= p_lo and e > e_hi for p, e in zip(ppl, ent)]
    return q2, q4, (p_lo, p_hi, e_lo, e_hi)


def assign(ppl, ent, ratio, tol=0.01, max_iter=10):
    """The spec in words: bisect a in [0, 1/2] for the largest kept count <= k, then fill; returns (quadrants, a)."""
    n = len(ppl)
    k = min(n, max(1, math.floor(ratio * n + 0.5)))

    def count(a):
        q2, q4 = regions(ppl, ent, a)[:2]
        return sum(q2) + sum(q4)

    lo, hi, evals = 0.0, 0.5, 1
    if count(0.5) <= k:
        lo = 0.5
    else:
        while hi - lo >= tol and evals < max_iter:
            mid = (lo + hi) / 2
            evals += 1
            c = count(mid)
            if c <= k:
                lo = mid
                if c == k:
                    break
            else:
                hi = mid
    q2, q4, (p_lo, p_hi, e_lo, e_hi) = regions(ppl, ent, lo)
    quad = []
    for i in range(n):
        if q2[i]:
            quad.append(2)
        elif q4[i]:
            quad.append(4)
        elif ppl[i] > p_hi and ent[i] > e_hi:
            quad.append(1)
        elif ppl[i] <= p_lo and ent[i] <= e_lo:
            quad.append(3)
        else:
            quad.append(0)

    def norm(xs):
        lo_, hi_ = min(xs), max(xs)
        return [(x - lo_) / (hi_ - lo_) if hi_ > lo_ else 0.0 for x in xs]

    pn, en = norm(ppl), norm(ent)
    while sum(q in (2, 4) for q in quad) < k:
        best, best_gap = None, None
        for i in range(n):  # strictly larger gap wins, so ties keep the lowest index
            if quad[i] in (2, 4):
                continue
            gap = max(pn[i] - en[i], en[i] - pn[i])
            if best is None or gap > best_gap:
                best, best_gap = i, gap
        quad[best] = 2 if pn[best] > en[best] else 4
    return quad, lo


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
