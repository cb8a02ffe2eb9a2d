"""Analysis of updates and masks: sparsity per layer and matrix type, overlap between masks, update rank.

Inputs are the per-tensor statistics of :func:`~peft_ext.subnet.diff_checkpoints` (``TensorDiff``)
or masks (a dict of boolean tensors or a :class:`~peft_ext.subnet.MaskFile`); outputs are rows
printed with :func:`format_table` and PNG plots.

Example:
    ```py
    >>> diff = diff_checkpoints("base_dir", "tuned_dir", tol=1e-5, compute_rank=True)
    >>> print(sparsity_report(diff.tensors))
    >>> plot_sparsity(diff.tensors, "sparsity.png")
    ```
"""

from __future__ import annotations

import re
from collections import defaultdict

from . import ops
from .masks import MaskFile
from .selectors import TensorDiff

_LAYER_RE = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_of(name: str) -> str:
    """Transformer block index in a parameter name (``"3"``), or ``"-"`` for weights outside the blocks."""
    match = _LAYER_RE.search(name)
    return match.group(1) if match else "-"


def matrix_type(name: str) -> str:
    """Module kind of a parameter: ``q_proj``, ``c_attn``, ``input_layernorm``, ``embed_tokens`` (``.bias`` kept)."""
    parts = name.split(".")
    if parts[-1] == "weight" and len(parts) > 1:
        return parts[-2]
    if parts[-1] == "bias" and len(parts) > 1:
        return parts[-2] + ".bias"
    return parts[-1]


def stats_from_masks(masks) -> list[TensorDiff]:
    """Per-tensor statistics (``changed`` = selected entries) of a dict of masks or a :class:`MaskFile`."""
    if isinstance(masks, MaskFile):
        out = []
        for name in masks.names():
            shape = masks.shape(name)
            out.append(TensorDiff(name, shape, _numel(shape), int(masks.indices(name).numel())))
        return out
    return [TensorDiff(n, tuple(m.shape), m.numel(), int(m.sum())) for n, m in masks.items()]


def _numel(shape) -> int:
    numel = 1
    for d in shape:
        numel *= int(d)
    return numel


def sparsity_by(tensors: list[TensorDiff], key: str = "layer") -> list[list]:
    """Rows ``[group, params, updated, % updated, % unchanged]`` grouped by ``"layer"``, ``"type"`` or ``"tensor"``.

    The last row is the total. "Update sparsity" in the paper is the unchanged fraction.
    """
    group_of = {"layer": lambda t: layer_of(t.name), "type": lambda t: matrix_type(t.name), "tensor": lambda t: t.name}
    if key not in group_of:
        raise ValueError(f"key={key!r} is unknown; use 'layer', 'type' or 'tensor'.")
    totals = defaultdict(lambda: [0, 0])
    for t in tensors:
        g = totals[group_of[key](t)]
        g[0] += t.numel
        g[1] += t.changed

    def sort_key(item):
        name = item[0]
        return (0, int(name), "") if name.isdigit() else (1, 0, name)

    rows = [_row(g, n, c) for g, (n, c) in sorted(totals.items(), key=sort_key)]
    n_all, c_all = sum(t.numel for t in tensors), sum(t.changed for t in tensors)
    rows.append(_row("total", n_all, c_all))
    return rows


def _row(group, numel, changed):
    frac = changed / numel if numel else 0.0
    return [group, numel, changed, 100 * frac, 100 * (1 - frac)]


SPARSITY_HEADERS = ["group", "params", "updated", "% updated", "% unchanged"]


def rank_rows(tensors: list[TensorDiff]) -> list[list]:
    """Rows ``[tensor, shape, rank, % of full rank]`` for the tensors whose update rank was computed."""
    rows = []
    for t in tensors:
        if t.rank is None:
            continue
        full = min(t.shape)
        rows.append([t.name, "x".join(map(str, t.shape)), t.rank, 100 * t.rank / full])
    return rows


def overlap_rows(masks1, masks2) -> list[list]:
    """Rows ``[tensor, |I1|, |I2|, |I1∩I2|, o1 %, o2 %, jaccard %, random o1 %, random jaccard %]`` and a total.

    Both inputs are dicts of masks or :class:`MaskFile` objects; only names present in both count.
    The "random" columns are the expectations for independent uniform masks of the same densities.
    """

    def names(m):
        return m.names() if isinstance(m, MaskFile) else list(m)

    def indices(m, n):
        return m.indices(n) if isinstance(m, MaskFile) else ops.mask_to_indices(m[n])

    def shape(m, n):
        return m.shape(n) if isinstance(m, MaskFile) else tuple(m[n].shape)

    common = [n for n in names(masks1) if n in set(names(masks2))]
    if not common:
        raise ValueError("the two mask sets share no parameter names; they must come from the same architecture.")
    rows, tot = [], [0, 0, 0, 0]
    for name in common:
        if shape(masks1, name) != shape(masks2, name):
            raise ValueError(f"mask {name!r} has shape {shape(masks1, name)} vs {shape(masks2, name)}.")
        numel = _numel(shape(masks1, name))
        i1, i2 = indices(masks1, name), indices(masks2, name)
        both = int(ops.indices_to_mask(i1, (numel,))[i2].sum())
        rows.append(_overlap_row(name, numel, i1.numel(), i2.numel(), both))
        for j, v in enumerate((numel, i1.numel(), i2.numel(), both)):
            tot[j] += v
    rows.append(_overlap_row("total", *tot))
    return rows


def _overlap_row(name, numel, n1, n2, both):
    o = ops.mask_overlap(both, n1, n2)
    r = ops.random_overlap(n1 / numel, n2 / numel)
    return [name, n1, n2, both, 100 * o["o1"], 100 * o["o2"], 100 * o["jaccard"], 100 * r["o1"], 100 * r["jaccard"]]


OVERLAP_HEADERS = ["tensor", "|I1|", "|I2|", "|I1∩I2|", "o1 %", "o2 %", "jaccard %", "random o1 %", "random J %"]


def format_table(headers: list[str], rows: list[list]) -> str:
    """Plain-text table; floats with 2 decimals, integers with thousands separators."""

    def cell(v):
        if isinstance(v, float):
            return f"{v:.2f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    cells = [headers] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for i, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def sparsity_report(tensors: list[TensorDiff], title: str = "update sparsity") -> str:
    """Per-layer and per-matrix-type tables (and update ranks when computed) as one printable string."""
    parts = [
        f"== {title}: per layer ==",
        format_table(SPARSITY_HEADERS, sparsity_by(tensors, "layer")),
        f"== {title}: per matrix type ==",
        format_table(SPARSITY_HEADERS, sparsity_by(tensors, "type")),
    ]
    ranks = rank_rows(tensors)
    if ranks:
        parts += ["== update rank per matrix ==", format_table(["tensor", "shape", "rank", "% of full"], ranks)]
    return "\n".join(parts)


def plot_sparsity(tensors: list[TensorDiff], path: str, title: str = "update sparsity") -> str:
    """PNG with % of entries updated per layer (one line per matrix type) and per matrix type (bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    per = defaultdict(dict)
    for t in tensors:
        layer = layer_of(t.name)
        if layer != "-":
            entry = per[matrix_type(t.name)].setdefault(int(layer), [0, 0])
            entry[0] += t.numel
            entry[1] += t.changed
    types = sparsity_by(tensors, "type")[:-1]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, layers in sorted(per.items()):
        xs = sorted(layers)
        ax1.plot(xs, [100 * layers[x][1] / layers[x][0] for x in xs], marker="o", label=kind)
    ax1.set_xlabel("layer")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_ylabel("% of entries updated")
    ax1.set_title(f"{title}: per layer")
    if per:
        ax1.legend(fontsize=7, ncol=2)
    ax2.bar([r[0] for r in types], [r[3] for r in types])
    ax2.set_ylabel("% of entries updated")
    ax2.set_title("per matrix type")
    ax2.tick_params(axis="x", rotation=60, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
