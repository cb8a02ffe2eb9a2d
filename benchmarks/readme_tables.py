"""The README's tables and the figures quoted beside them, rendered from the results files.

Each generated block in README.md sits between ``<!-- table: NAME -->`` and ``<!-- /table -->``,
where NAME is a key of :data:`BLOCKS`; its renderer reads one file in ``benchmarks/results/`` and
returns the block's markdown, every row of the file included (the slow points as well as the fast).

    python benchmarks/readme_tables.py --check   # exit 1 and print the diff when README and files disagree
    python benchmarks/readme_tables.py --write   # rewrite the blocks from the files

Plain text parsing only (no torch), so the check is quick enough for every CI run.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEGIN = re.compile(r"^<!-- table: ([a-z0-9_]+) -->$")
END = "<!-- /table -->"


class ResultsFormatError(ValueError):
    """A results file does not contain what its renderer reads."""


def _body(path: Path) -> list[str]:
    """The lines of a results file after its ``#`` header."""
    if not path.exists():
        raise ResultsFormatError(f"{path} does not exist; run the benchmark that writes it (see its README section).")
    return [line for line in path.read_text().splitlines() if not line.startswith("#")]


def _matches(path: Path, pattern: str, minimum: int = 1) -> list[re.Match]:
    """Every line of ``path`` matching ``pattern``; an error naming the file when fewer than ``minimum`` do."""
    found = [m for line in _body(path) if (m := re.match(pattern, line))]
    if len(found) < minimum:
        raise ResultsFormatError(
            f"{path}: expected at least {minimum} line(s) matching {pattern!r}, found {len(found)}."
        )
    return found


def _times(x: float) -> str:
    return f"{x:.2f}x"


# ---------------------------------------------------------------------------------------------------- MoRA
def mora_speed(path: Path) -> str:
    rows = _matches(
        path,
        r"^((?:LoRA|MoRA \w+) r=\d+)\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)x\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x$",
        minimum=2,
    )
    lines = ["| adapter | trainable | step ms | step time / LoRA | memory / LoRA |", "|---|---|---|---|---|"]
    for m in rows:
        name, params, ms, time_ratio, _acts, _state, memory = m.groups()
        lines.append(f"| {name} | {params} | {ms} | {time_ratio}x | {memory}x |")
    return "\n".join(lines)


def merge_precision(path: Path, dtypes=("bfloat16", "float16")) -> str:
    rounds = _matches(path, r"^dtype .* changed@(\d+)")[0].group(1)
    lines = [
        f"| dtype | update / weight (RMS) | adapter | entries changed, 1 round trip | max / mean abs change "
        f"| entries changed, {rounds} round trips | max / mean abs change |",
        "|---|---|---|---|---|---|---|",
    ]
    for line in _body(path):
        fields = line.split()
        if len(fields) < 9 or fields[0] not in dtypes:
            continue
        dtype, scale, adapter = fields[0], fields[1], " ".join(fields[2:-6])
        f1, m1, a1, fn, mn, an = fields[-6:]
        lines.append(f"| {dtype} | {scale} | {adapter} | {f1} | {m1} / {a1} | {fn} | {mn} / {an} |")
    if len(lines) == 2:
        raise ResultsFormatError(f"{path}: no rows for {dtypes}.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- SUBNET
def subnet_step(path: Path) -> str:
    rows = _matches(path, r"^(full|lora|shira|subnet)\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", minimum=2)
    lines = [
        "| method | trainable | step ms (median) | time / SUBNET's | peak RSS growth MB |",
        "|---|---|---|---|---|",
    ]
    names = {"full": "full fine-tuning", "lora": "LoRA", "shira": "SHiRA", "subnet": "SUBNET"}
    ms = {}
    for m in rows:
        method, params, step, ratio, rss = m.groups()
        ms[names[method]] = float(step)
        lines.append(f"| {names[method]} | {params} | {step} | {ratio}x | {rss} |")
    fastest, slowest = min(ms, key=ms.get), max(ms, key=ms.get)
    spread = ms[slowest] / ms[fastest] - 1
    lines += [
        "",
        f"The {len(ms)} medians lie within {spread:.1%} of each other ({slowest} {ms[slowest]:g} ms against "
        f"{fastest} {ms[fastest]:g} ms); SUBNET takes {ms['SUBNET'] / ms['SHiRA']:.2f}x SHiRA's step time "
        f"and {ms['SUBNET'] / ms['LoRA']:.2f}x LoRA's.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- Prefix Grouper
def prefix_grouper_logps(path: Path) -> str:
    number = r"\s+([\d.]+)"
    measured = _matches(
        path,
        r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+) \|" + number * 2 + r"\s+([\d.]+)x\s+([\d.]+)x"
        r"\s+([\d.]+)\s+([\d.]+)x \|" + number * 3 + r"$",
    )
    skipped = [m for line in _body(path) if (m := re.match(r"^\s*(\d+(?:\s+\d+){5}) \| skipped: (.*)$", line))]
    unread = [line for line in _body(path) if re.match(r"^\s*\d", line)]
    if len(unread) != len(measured) + len(skipped):
        rows = {m.string for m in measured + skipped}
        bad = next(line for line in unread if line not in rows)
        raise ResultsFormatError(
            f"{path}: cannot read the row {bad.strip()!r}; every point must be measured or skipped."
        )
    lines = [
        "| heads × dim (KV) | P | R | G | stock s | grouped s | speedup | ideal | measured / ideal "
        "| wall-clock speedup | memory grouped / stock |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    points = []
    for m in measured:
        heads, dim, kv, p, r, g, stock, grouped, speedup, ideal, ratio, wall, _smb, _gmb, memory = m.groups()
        points.append(
            dict(p=p, r=r, g=g, speedup=float(speedup), ratio=float(ratio), wall=float(wall), mem=float(memory))
        )
        lines.append(
            f"| {heads} × {dim} ({kv}) | {p} | {r} | {g} | {stock} | {grouped} | {speedup}x | {ideal}x | {ratio} "
            f"| {wall}x | {memory} |"
        )
    for m in skipped:
        heads, dim, kv, p, r, g = m.group(1).split()
        lines.append(f"| {heads} × {dim} ({kv}) | {p} | {r} | {g} | skipped: {m.group(2)} | | | | | | |")

    def span(key, fmt=_times):
        values = [pt[key] for pt in points]
        return f"{fmt(min(values))} to {fmt(max(values))}"

    def where(pts, key):
        return ", ".join(f"P={pt['p']}, R={pt['r']}, G={pt['g']} ({pt[key]:.2f}x)" for pt in pts)

    faster = [pt for pt in points if pt["speedup"] > 1]
    if len(faster) == len(points):
        cpu = f"Every measured point is faster than stock in process CPU time ({span('speedup')})"
    else:
        slower = where([pt for pt in points if pt["speedup"] <= 1], "speedup")
        cpu = (
            f"{len(faster)} of {len(points)} points are faster than stock in process CPU time; not faster at {slower}"
        )
    slow_wall = [pt for pt in points if pt["wall"] < 1]
    wall = f"In wall-clock time the speedup is {span('wall')}" + (
        f", below 1x at {where(slow_wall, 'wall')}: there the grouped pass took longer than stock's."
        if slow_wall
        else ", above 1x everywhere."
    )
    lower = all(pt["mem"] < 1 for pt in points)
    memory = f"{'lower' if lower else 'not always lower'} peak memory ({span('mem', lambda x: f'{x:.2f}')} of stock)"
    lines += [
        "",
        f"{cpu}, at {span('ratio', lambda x: f'{x:.2f}')} of the ideal ratio, with {memory}. {wall}",
    ]
    return "\n".join(lines)


ARCHITECTURE_VERDICTS = ("exact", "refused", "not buildable", "wrong", "crash")


def architecture_rows(path: Path) -> list[tuple[str, str, str]]:
    """``(model_type, verdict, detail)`` rows of a ``prefix_grouper_architectures`` results file."""
    rows = []
    for line in _body(path):
        if line.startswith("| ") and not line.startswith("| model type") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
            if len(cells) == 3 and cells[1] in ARCHITECTURE_VERDICTS:
                rows.append((cells[0], cells[1], cells[2]))
    return rows


def architecture_summary(rows) -> str:
    """Verdict counts, the model types and the config variants (names with a parenthesis) apart."""
    parts = []
    model_types = [r for r in rows if " (" not in r[0]]
    variants = [r for r in rows if " (" in r[0]]
    for label, subset in (("model types", model_types), ("config variants", variants)):
        if subset:
            counts = {verdict: sum(1 for _, v, _ in subset if v == verdict) for verdict in ARCHITECTURE_VERDICTS}
            parts.append(f"{len(subset)} {label}: " + ", ".join(f"{counts[v]} {v}" for v in ARCHITECTURE_VERDICTS))
    return "; ".join(parts)


def refusal_reason(detail: str) -> str:
    """A refusal message without the model type, figures and fallback: what the README groups refusals by."""
    text = re.sub(r"^Prefix grouping cannot run model_type='[^']*'[^:]*: ", "", detail)
    text = text.split(" Instead,")[0]
    if "self-check batch" in text:
        cause = text.split(" in float32). ")[-1].split(" in bfloat16). ")[-1]
        if "its forward fails on the packed rows" in text:
            error = re.search(r"\((\w+Error)", text)
            return f"self-check: its forward fails on the packed rows ({error.group(1) if error else 'an error'})"
        if "position_ids" in cause:
            return "self-check: grouped log-probs differ from stock; its output ignores position_ids"
        if "add to the attention mask" in cause:
            return "self-check: grouped log-probs differ from stock; its layers add a bias to the attention mask"
        if "all-zero parameters" in cause:
            return "self-check: grouped log-probs differ from stock once its all-zero parameters move"
        return "self-check: grouped log-probs differ from stock"
    text = re.sub(r"\(checked on the meta device.*\)", "", text)
    text = re.sub(r"sliding_window=\d+.*", "a sliding window the sequences can outgrow", text)
    text = re.sub(r"only \d+ of its \d+ layers", "only some of its layers", text)
    return text.split(". ")[0].rstrip(". ")


def prefix_grouper_architectures(path: Path) -> str:
    rows = architecture_rows(path)
    if not rows:
        raise ResultsFormatError(f"{path}: no '| model type | verdict | detail |' rows.")
    by_verdict = {verdict: [row for row in rows if row[1] == verdict] for verdict in ARCHITECTURE_VERDICTS}
    lines = [f"{architecture_summary(rows)}.", "", "| verdict | model types |", "|---|---|"]
    for verdict in ARCHITECTURE_VERDICTS:
        names = ", ".join(f"`{name}`" for name, _, _ in by_verdict[verdict]) or "none"
        lines.append(f"| {verdict} ({len(by_verdict[verdict])}) | {names} |")
    lines += ["", "Refusals, grouped by reason (the results file has each full message):", ""]
    reasons: dict[str, list[str]] = {}
    for name, _, detail in by_verdict["refused"]:
        reasons.setdefault(refusal_reason(detail), []).append(name)
    for reason, names in sorted(reasons.items(), key=lambda item: -len(item[1])):
        lines.append(f"- {reason} ({len(names)}): " + ", ".join(f"`{n}`" for n in names))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- REDI
def redi_quality(path: Path) -> str:
    """The results file's two tables (per variant, then paired differences), verbatim in a code block."""
    body = _body(path)
    starts = [i for i, line in enumerate(body) if line.startswith("variant ")]
    if len(starts) != 2:
        raise ResultsFormatError(f"{path}: expected two tables headed 'variant ...', found {len(starts)}.")
    first = body[starts[0] : body.index("", starts[0])]
    second = body[starts[1] - 1 : body.index("", starts[1])]
    return "\n".join(["```", *first, *second, "```"])


def redi_speed(path: Path) -> str:
    rows = _matches(path, r"^(DPO|REDI)\s+(True|False)\s+([\d.]+)\s+(\d+)\s+(-?\d+)$", minimum=2)
    ratio = _matches(path, r"^REDI / DPO: step time ([\d.]+)x, peak RSS ([\d.]+)x, RSS increase ([\d.]+)x$")[0]
    lines = ["| trainer | reference model | step s | peak RSS MB | RSS increase MB |", "|---|---|---|---|---|"]
    for m in rows:
        kind, ref, step, peak, increase = m.groups()
        lines.append(f"| {kind} | {'yes' if ref == 'True' else 'no'} | {step} | {peak} | {increase} |")
    step, peak, increase = ratio.groups()
    lines += ["", f"REDI / DPO: step time {step}x, peak resident memory {peak}x, its increase {increase}x."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- Q-Tuning
def qtuning_speed(path: Path) -> str:
    rows = _matches(
        path,
        r"^(SFTTrainer \(stock\)|Q-Tuning \w+)\s+(-|\d+% x \d+%)\s+([\d.]+)\s+([\d.]+)x\s+([\d.]+)\.\.([\d.]+)\s+(\d+)$",
        minimum=2,
    )
    lines = [
        "| trainer | samples × tokens kept | epoch s (median) | / stock | min .. max s | tokens through fwd+bwd |",
        "|---|---|---|---|---|---|",
    ]
    for m in rows:
        name, budget, med, ratio, lo, hi, tokens = m.groups()
        lines.append(f"| {name} | {budget.replace(' x ', ' × ')} | {med} | {ratio}x | {lo} .. {hi} | {tokens} |")
    return "\n".join(lines)


def qtuning_quality(path: Path) -> str:
    before = _matches(path, r"^before SFT: accuracy ([\d.]+) \(per seed (.*)\)$")[0]
    rows = _matches(
        path,
        r"^(full-data SFT|Q-Tuning|random pruning)\s+(\d+% x \d+%)\s+([\d.]+)\s+([\d.]+)\s+((?:[\d.]+, )*[\d.]+)"
        r"\s+([\d.]+)\s+(-|\d+% / \d+% / \d+% / \d+%)$",
        minimum=2,
    )
    lines = [
        "| method | samples × tokens kept | accuracy (mean) | std | per seed | kept samples: clean / noise / easy / hard |",
        "|---|---|---|---|---|---|",
        f"| before SFT | - | {before.group(1)} | | {before.group(2)} | - |",
    ]
    for m in rows:
        name, budget, mean, std, per_seed, _seconds, kept = m.groups()
        lines.append(f"| {name} | {budget.replace(' x ', ' × ')} | {mean} | {std} | {per_seed} | {kept} |")
    return "\n".join(lines)


def mora_speed_layer(path: Path) -> str:
    rows = _matches(
        path,
        r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x\s+([\d.]+)x"
        r"\s+([\d.]+)x\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$",
        minimum=1,
    )
    lines = [
        "| d | r | tokens | r̂ | LoRA ms | before / LoRA | rotation / LoRA | sharing / LoRA | 1 + r̂/d_out | FLOPs / LoRA "
        "| rotation / goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in rows:
        d, r, tokens, r_hat, lora_ms, _b, _rot, _sh, before, rotation, sharing, inherent, flops, goal = m.groups()
        lines.append(
            f"| {d} | {r} | {tokens} | {r_hat} | {lora_ms} | {before}x | {rotation}x | {sharing}x | {inherent} "
            f"| {flops} | {goal} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- quickstart
def quickstart(path: Path, threads: int = 1) -> str:
    """The quickstart's table from its run at ``threads`` threads, as a text block."""
    body = _body(path)
    marker = f"== quickstart with OMP_NUM_THREADS={threads}:"
    starts = [i for i, line in enumerate(body) if line.startswith(marker)]
    if not starts:
        raise ResultsFormatError(f"{path}: no line starting with {marker!r}; run benchmarks/quickstart_threads.py.")
    table = []
    for line in body[starts[0] + 1 :]:
        if not line.strip() or line.startswith(("Measured in this run", "==")):
            break
        table.append(line.rstrip())
    if len(table) < 3:
        raise ResultsFormatError(f"{path}: the table after {marker!r} has {len(table)} line(s).")
    return "\n".join(["```text", *table, "```"])


# ---------------------------------------------------------------------------------------------------- prefix sharing
def prefix_sharing_dpo(path: Path) -> str:
    number = r"\s+([\d.]+)"
    rows = _matches(
        path,
        r"^\s*(dpo\+ref|redi)\s+(\d+)\s+(\d+)\s+([\d.]+) \|" + number * 2 + r"\s+([\d.]+)x\s+([\d.]+)x"
        r"\s+([\d.]+)\s+([\d.]+)x \|" + number * 3 + r"$",
    )
    crossing = _matches(path, r"^crossing: (.*?)(?: \(slower or equal: .*\))?$")[0].group(1)
    names = {"dpo+ref": "DPO + reference model", "redi": "REDI (no reference)"}
    lines = [
        "| trainer | P | R | P/R | stock s | shared s | speedup | ideal | measured / ideal | memory shared / stock |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    slower = []
    for m in rows:
        trainer, p, r, ratio, stock, shared, speedup, ideal, meas, _wall, _smb, _gmb, memory = m.groups()
        lines.append(
            f"| {names[trainer]} | {p} | {r} | {ratio} | {stock} | {shared} | {speedup}x | {ideal}x | {meas} "
            f"| {memory} |"
        )
        if float(speedup) <= 1.0:
            slower.append(f"{names[trainer]} at P={p}, R={r} ({speedup}x)")
    lines += [
        "",
        f"Measured crossing: {crossing}. Where it does not pay: "
        + ("; ".join(slower) if slower else "no measured point is slower shared")
        + ".",
    ]
    return "\n".join(lines)


# name: (results file, renderer)
BLOCKS: dict[str, tuple[str, Callable[[Path], str]]] = {
    "quickstart": ("quickstart_threads.txt", quickstart),
    "mora_speed": ("mora_speed.txt", mora_speed),
    "mora_speed_layer": ("mora_speed.txt", mora_speed_layer),
    "merge_precision": ("merge_precision.txt", merge_precision),
    "subnet_step": ("subnet_speed.txt", subnet_step),
    "prefix_grouper_logps": ("prefix_grouper_logps_all.txt", prefix_grouper_logps),
    "prefix_grouper_architectures": ("prefix_grouper_architectures.txt", prefix_grouper_architectures),
    "prefix_sharing_dpo": ("prefix_sharing_dpo.txt", prefix_sharing_dpo),
    "redi_quality_teacher": ("redi_quality_teacher.txt", redi_quality),
    "redi_speed": ("redi_speed.txt", redi_speed),
    "qtuning_speed": ("qtuning_speed.txt", qtuning_speed),
    "qtuning_quality": ("qtuning_quality.txt", qtuning_quality),
}


def blocks(readme: str) -> list[tuple[str, int, int]]:
    """``(name, begin line, end line)`` of every generated block in ``readme`` (0-based marker lines).

    Raises ``ValueError`` for a block name without a renderer, a block that appears twice, is never closed or
    holds another, a stray end marker, or a renderer whose block is missing.
    """
    found, current = [], None
    for i, line in enumerate(readme.split("\n")):
        begin = BEGIN.match(line.strip())
        if begin:
            name = begin.group(1)
            if current:
                raise ValueError(f"README line {i + 1}: block {name!r} starts inside {current[0]!r}; close it first.")
            if name not in BLOCKS:
                raise ValueError(f"README line {i + 1}: unknown block {name!r}; known: {', '.join(BLOCKS)}.")
            if name in [b[0] for b in found]:
                raise ValueError(f"README line {i + 1}: block {name!r} appears twice.")
            current = (name, i)
        elif line.strip() == END:
            if not current:
                raise ValueError(f"README line {i + 1}: {END} without a '<!-- table: NAME -->' before it.")
            found.append((*current, i))
            current = None
    if current:
        raise ValueError(f"README: block {current[0]!r} is never closed; add {END} after it.")
    missing = [name for name in BLOCKS if name not in [b[0] for b in found]]
    if missing:
        raise ValueError(f"README has no block for {', '.join(missing)}; add '<!-- table: NAME -->' ... '{END}'.")
    return found


def render(readme: str, results: Path = RESULTS) -> str:
    """``readme`` with every generated block re-rendered from the files in ``results``."""
    lines = readme.split("\n")
    for name, begin, end in reversed(blocks(readme)):
        file, renderer = BLOCKS[name]
        lines[begin + 1 : end] = [renderer(results / file)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 and print the diff when the README is stale")
    mode.add_argument("--write", action="store_true", help="rewrite the README's generated blocks")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results files' folder")
    args = parser.parse_args(argv)
    current = args.readme.read_text()
    try:
        wanted = render(current, args.results)
    except (ValueError, ResultsFormatError) as error:
        print(f"readme_tables: {error}", file=sys.stderr)
        return 2
    if args.write:
        if wanted != current:
            args.readme.write_text(wanted)
        print(f"{args.readme}: {len(BLOCKS)} blocks {'updated' if wanted != current else 'already up to date'}")
        return 0
    if wanted == current:
        print(f"{args.readme}: all {len(BLOCKS)} generated blocks match benchmarks/results/")
        return 0
    diff = difflib.unified_diff(
        current.splitlines(), wanted.splitlines(), "README.md", "README.md (from benchmarks/results/)", lineterm=""
    )
    print("\n".join(diff))
    print(
        f"\n{args.readme} disagrees with benchmarks/results/: run `python benchmarks/readme_tables.py --write`, "
        "or fix the results file the diff names.",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
