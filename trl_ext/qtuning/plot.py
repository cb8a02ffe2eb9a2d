"""The Error-Uncertainty plane of scored batches, as recorded by the trainer and as a scatter plot."""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

import torch

QUADRANT_STYLE = {
    1: ("tab:red", "Q1 noise (dropped)"),
    2: ("tab:orange", "Q2 misconception (kept, token-pruned)"),
    3: ("tab:gray", "Q3 redundant (dropped)"),
    4: ("tab:blue", "Q4 calibration (kept whole)"),
    0: ("lightgray", "between thresholds (dropped)"),
}


@dataclass
class EUPlaneRecord:
    """The EU-plane scores of one scored micro-batch (CPU tensors of shape ``(num_samples,)``).

    ``quadrant`` uses the codes of :class:`~trl_ext.qtuning.scoring.QuadrantAssignment`; the thresholds
    are that batch's ``Q_a`` / ``Q_{1-a}`` of perplexity and entropy for the shared ratio ``a``.
    """

    step: int
    ppl: torch.Tensor
    entropy: torch.Tensor
    quadrant: torch.Tensor
    a: float
    ppl_low: float
    ppl_high: float
    ent_low: float
    ent_high: float
    process_index: int = 0


def plot_eu_plane(records: EUPlaneRecord | Iterable[EUPlaneRecord], path: str | os.PathLike | None = None, title=None):
    """Scatter samples on the Error (perplexity, log scale) - Uncertainty (mean entropy) plane, coloured by quadrant.

    One record draws that batch's four thresholds (solid). Several records (e.g. an epoch) are drawn
    together; thresholds differ per batch, so their medians are drawn dashed. Needs matplotlib; uses
    its object API, so no global pyplot state is touched. Returns the ``matplotlib.figure.Figure`` and
    saves it as PNG when ``path`` is given.

    Example:
        ```py
        >>> fig = plot_eu_plane(trainer.eu_records, "eu_plane.png")
        ```
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plot_eu_plane needs matplotlib: pip install matplotlib") from e
    records = [records] if isinstance(records, EUPlaneRecord) else list(records)
    if not records:
        raise ValueError(
            "No EU-plane records to plot. Train with QTuningConfig(eu_record_steps > 0) first, or pass records."
        )
    ppl = torch.cat([r.ppl for r in records]).double()
    ent = torch.cat([r.entropy for r in records]).double()
    quadrant = torch.cat([r.quadrant for r in records])

    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    for q in (0, 3, 1, 4, 2):
        sel = quadrant == q
        if sel.any():
            color, label = QUADRANT_STYLE[q]
            ax.scatter(ppl[sel], ent[sel], s=14, c=color, label=f"{label}: {int(sel.sum())}", alpha=0.8)
    if len(records) == 1:
        thresholds, style, note = records[0], "-", f"a={records[0].a:.3f}"
        values = [thresholds.ppl_low, thresholds.ppl_high, thresholds.ent_low, thresholds.ent_high]
    else:
        values = [
            statistics.median(getattr(r, name) for r in records)
            for name in ("ppl_low", "ppl_high", "ent_low", "ent_high")
        ]
        style, note = "--", f"median thresholds of {len(records)} batches"
    ax.axvline(values[0], color="black", ls=style, lw=0.8, label=f"Q_a / Q_(1-a) ({note})")
    ax.axvline(values[1], color="black", ls=style, lw=0.8)
    ax.axhline(values[2], color="black", ls=style, lw=0.8)
    ax.axhline(values[3], color="black", ls=style, lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("error: sample perplexity (log scale)")
    ax.set_ylabel("uncertainty: mean predictive entropy")
    steps = sorted({r.step for r in records})
    default = f"EU plane, step {steps[0]}" if len(steps) == 1 else f"EU plane, steps {steps[0]}-{steps[-1]}"
    ax.set_title(title or default)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
