"""Data tooling for REDI: label teacher traces with a verifier, then build preference pairs.

Traces are labelled by a verifier the caller passes (:func:`math_verify_checker`, or a task's
own checker). Each prompt contributes one pair: its first correct trace (chosen) and its first
incorrect trace (rejected), after length filtering. Prompts that cannot form a pair are dropped
and counted by reason.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset

Verifier = Callable[[str, Any], Any]
"""A trace checker: ``verifier(completion, answer)`` is truthy when the trace is correct."""


def math_verify_checker(completion: str, answer) -> bool:
    """Is ``completion`` correct for ``answer`` by ``math-verify`` (boxed LaTeX answers, symbolic equality)?

    Pass it to :func:`label_traces` for real reasoning traces; needs ``pip install "peft-trl-ext[math]"``.

    Example:
        ```py
        >>> math_verify_checker(r"so x = \\boxed{\\frac{1}{2}}", "0.5")
        True
        ```
    """
    try:
        import math_verify
    except ImportError as err:
        raise ImportError("math_verify_checker needs math-verify: pip install 'peft-trl-ext[math]'.") from err
    gold = math_verify.parse(str(answer) if "$" in str(answer) or "\\" in str(answer) else f"${answer}$")
    return bool(math_verify.verify(gold, math_verify.parse(completion)))


def verify_traces(completions, answers, verifier: Verifier) -> tuple[list[bool], int]:
    """Run ``verifier(completion, answer)`` on every trace; return the labels and how many calls raised.

    A trace whose verifier call raises is labelled incorrect and counted, so one malformed trace
    cannot stop a run over thousands.

    Example:
        ```py
        >>> def strict(completion, answer):
        ...     return int(completion) == answer  # raises on "oops"
        >>> verify_traces(["3", "oops"], [3, 3], strict)
        ([True, False], 1)
        ```
    """
    if not callable(verifier):
        raise TypeError(
            f"verifier={verifier!r} is not callable; pass a function (completion, answer) -> bool, "
            "e.g. trl_ext.redi.math_verify_checker."
        )
    labels, errors = [], 0
    for completion, answer in zip(completions, answers, strict=True):
        try:
            labels.append(bool(verifier(completion, answer)))
        except Exception:  # a verifier bug or an unparsable trace: that trace is wrong, the run goes on
            labels.append(False)
            errors += 1
    return labels, errors


def label_traces(
    dataset: Dataset,
    verifier: Verifier,
    completion_column: str = "completion",
    answer_column: str = "answer",
    label_column: str = "correct",
) -> Dataset:
    """Add a boolean ``label_column`` saying whether ``verifier(completion, answer)`` accepts each trace.

    ``verifier`` is any callable ``(completion, answer) -> bool``: :func:`math_verify_checker` for
    boxed math answers, or a task's own checker (the toy task's is
    ``trl_ext.toy.check_reasoning_answer``). A trace on which the verifier raises is labelled
    incorrect (see :func:`verify_traces`).

    Example:
        ```py
        >>> from trl_ext.redi import label_traces, math_verify_checker
        >>> labelled = label_traces(traces, verifier=math_verify_checker)
        ```
    """
    if not callable(verifier):
        raise TypeError(
            f"verifier={verifier!r} is not callable; pass a function (completion, answer) -> bool, "
            "e.g. trl_ext.redi.math_verify_checker."
        )
    for col in (completion_column, answer_column):
        if col not in dataset.column_names:
            raise ValueError(f"Column {col!r} is missing; the dataset has {dataset.column_names}.")
    labels, _ = verify_traces(dataset[completion_column], dataset[answer_column], verifier)
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
