"""Data tooling for REDI: label teacher traces with a verifier, then build preference pairs.

Each prompt contributes one pair: its first correct trace (chosen) and its first incorrect
trace (rejected), after length filtering. Prompts that cannot form a pair are dropped and
counted by reason.
"""

from __future__ import annotations

import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from datasets import Dataset

from trl_ext.toy.data import check_reasoning_answer

BOXED_RE = re.compile(r"\\boxed\{")


def _math_verify():
    try:
        import math_verify
    except ImportError:
        return None
    return math_verify


def verify_trace(completion: str, answer, verifier: str = "auto") -> bool:
    """Is ``completion`` correct for ``answer``?

    ``verifier``: ``"math"`` uses ``math-verify`` (boxed LaTeX answers, symbolic equality);
    ``"toy"`` uses the toy task's exact ``Answer: N`` checker; ``"auto"`` uses math-verify
    when it is installed and the trace contains ``\\boxed{``, else the toy checker.
    """
    if verifier not in ("auto", "math", "toy"):
        raise ValueError(f"verifier={verifier!r} is unknown; use 'auto', 'math' or 'toy'.")
    math_verify = _math_verify()
    use_math = verifier == "math" or (verifier == "auto" and math_verify is not None and BOXED_RE.search(completion))
    if use_math:
        if math_verify is None:
            raise ImportError("verifier='math' needs math-verify: pip install 'peft-trl-ext[math]'.")
        gold = math_verify.parse(str(answer) if "$" in str(answer) or "\\" in str(answer) else f"${answer}$")
        return bool(math_verify.verify(gold, math_verify.parse(completion)))
    return check_reasoning_answer(completion, answer) == 1.0


def label_traces(
    dataset: Dataset,
    completion_column: str = "completion",
    answer_column: str = "answer",
    label_column: str = "correct",
    verifier: str = "auto",
) -> Dataset:
    """Add a boolean ``label_column`` saying whether each trace verifies against its answer."""
    for col in (completion_column, answer_column):
        if col not in dataset.column_names:
            raise ValueError(f"Column {col!r} is missing; the dataset has {dataset.column_names}.")
    labels = [verify_trace(c, a, verifier) for c, a in zip(dataset[completion_column], dataset[answer_column])]
    if label_column in dataset.column_names:
        dataset = dataset.remove_columns(label_column)
    return dataset.add_column(label_column, labels)


@dataclass
class PairReport:
    """What :func:`build_redi_pairs` kept and dropped, by reason."""

    prompts: int = 0
    pairs: int = 0
    dropped: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        return f"{self.pairs} pairs from {self.prompts} prompts; dropped {sum(self.dropped.values())} ({reasons})"


def build_redi_pairs(
    traces: Dataset,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    label_column: str = "correct",
    min_length: int = 1,
    max_length: int | None = None,
    tokenizer=None,
    keep_columns: tuple[str, ...] = ("answer",),
) -> tuple[Dataset, PairReport]:
    """Build (prompt, chosen, rejected) triplets from labelled teacher traces.

    Per prompt (in order of first appearance) takes the first correct trace as ``chosen``
    and the first incorrect one as ``rejected``, among traces whose length (tokens if a
    ``tokenizer`` is given, else characters) is within ``[min_length, max_length]``.

    Returns the pairs and a :class:`PairReport` of how many prompts were dropped and why:
    ``no correct trace``, ``no incorrect trace``, or ``all traces filtered by length``.

    Example:
        ```py
        >>> from trl_ext.toy import make_reasoning_traces
        >>> pairs, report = build_redi_pairs(make_reasoning_traces(100))
        >>> print(report)
        ```
    """
    for col in (prompt_column, completion_column, label_column):
        if col not in traces.column_names:
            raise ValueError(
                f"Column {col!r} is missing; the traces have {traces.column_names}. "
                f"Label them first with label_traces(...) or pass {col.split('_')[0]}_column=..."
            )
    if max_length is not None and max_length < min_length:
        raise ValueError(f"max_length={max_length} is below min_length={min_length}.")

    def length(text) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if tokenizer else len(text)

    groups: OrderedDict = OrderedDict()
    extras = [c for c in keep_columns if c in traces.column_names]
    for row in traces:
        key = str(row[prompt_column])
        groups.setdefault(key, {"prompt": row[prompt_column], "traces": [], **{c: row[c] for c in extras}})
        groups[key]["traces"].append((row[completion_column], bool(row[label_column])))

    report = PairReport(prompts=len(groups))
    rows = {"prompt": [], "chosen": [], "rejected": [], **{c: [] for c in extras}}
    for group in groups.values():
        kept = [(t, ok) for t, ok in group["traces"] if min_length <= length(t) <= (max_length or float("inf"))]
        chosen = next((t for t, ok in kept if ok), None)
        rejected = next((t for t, ok in kept if not ok), None)
        if not kept:
            report.dropped["all traces filtered by length"] += 1
        elif chosen is None:
            report.dropped["no correct trace"] += 1
        elif rejected is None:
            report.dropped["no incorrect trace"] += 1
        else:
            rows["prompt"].append(group["prompt"])
            rows["chosen"].append(chosen)
            rows["rejected"].append(rejected)
            for c in extras:
                rows[c].append(group[c])
    report.pairs = len(rows["prompt"])
    return Dataset.from_dict(rows), report


def positives(traces: Dataset, label_column: str = "correct", completion_column: str = "completion") -> Dataset:
    """The correct traces only, as a prompt/completion SFT dataset (REDI's first stage)."""
    return traces.filter(lambda ok: bool(ok), input_columns=label_column).select_columns(
        [c for c in traces.column_names if c != label_column]
    )
