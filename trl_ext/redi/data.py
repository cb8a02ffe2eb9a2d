"""Data tooling for REDI: label teacher traces with a verifier, then build preference pairs.

Traces are labelled by a verifier the caller passes (:func:`math_verify_checker`, or a task's
own checker), which must return a real ``bool`` (or an int 0/1): anything else stops the run,
naming the value and the row. A trace on which the verifier raises gets no label (``correct`` is
``None``, the reason is kept in the ``verifier_error`` column): it is never a negative, it is
excluded from the pairs and counted by reason.

Each (prompt, answer) group contributes one pair: its first correct trace (chosen) and its first
incorrect trace (rejected), after length filtering. A completion labelled both correct and
incorrect in one group is excluded, so no pair has chosen == rejected. Groups that cannot form a
pair are dropped and counted by reason.
"""

from __future__ import annotations

import json
import logging
import numbers
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset

logger = logging.getLogger(__name__)

Verifier = Callable[[str, Any], Any]
"""A trace checker: ``verifier(completion, answer)`` returns True when the trace is correct, False when not."""

ERROR_COLUMN = "verifier_error"
"""Column of labelled traces holding, per trace, why the verifier raised ("" when it did not)."""

CONTRADICTION = "same completion labelled both correct and incorrect"


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


def as_label(value, where: str) -> bool:
    """``value`` as a label: a bool (Python or NumPy), or an integer 0 or 1; anything else is a ``ValueError``.

    ``bool()`` would read the string ``"False"`` or a partial score of 0.2 as correct, so no other
    type is coerced. ``where`` names the row in the error.

    Example:
        ```py
        >>> as_label(1, "row 0"), as_label(False, "row 1")
        (True, False)
        ```
    """
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise ValueError(
        f"{where}: the label {value!r} ({type(value).__name__}) is not a bool. A verifier must return True or "
        "False (or 1/0), and a `correct` column must hold booleans: a string or a partial score is not read as "
        "a label. Fix the verifier (e.g. `return score == 1.0`) or the column."
    )


def error_kind(reason: str) -> str:
    """The report's key for a stored verifier error: its exception type, not the per-trace message."""
    return reason.split(":", 1)[0]


def verify_traces(completions, answers, verifier: Verifier) -> tuple[list[bool | None], list[str]]:
    """Run ``verifier(completion, answer)`` on every trace; return the labels and, per trace, why it raised.

    A trace whose verifier call raises gets the label ``None`` and a reason
    (``"verifier raised <Exception>: <message>"``); every other trace gets ``""``. One malformed
    trace does not stop a run over thousands, and it never becomes a negative. A result that is
    not a bool (or an int 0/1) raises a ``ValueError`` naming the value and the row
    (see :func:`as_label`).

    Example:
        ```py
        >>> def strict(completion, answer):
        ...     return int(completion) == answer  # raises on "oops"
        >>> verify_traces(["3", "oops"], [3, 3], strict)
        ([True, None], ['', "verifier raised ValueError: invalid literal for int() with base 10: 'oops'"])
        ```
    """
    if not callable(verifier):
        raise TypeError(
            f"verifier={verifier!r} is not callable; pass a function (completion, answer) -> bool, "
            "e.g. trl_ext.redi.math_verify_checker."
        )
    labels, reasons = [], []
    for row, (completion, answer) in enumerate(zip(completions, answers, strict=True)):
        try:
            result = verifier(completion, answer)
        except Exception as err:  # a verifier bug or an unparsable trace: no label, the run goes on
            labels.append(None)
            reasons.append(f"verifier raised {type(err).__name__}: {err}"[:300])
            continue
        labels.append(as_label(result, f"verifier result for row {row} (completion {str(completion)[:60]!r})"))
        reasons.append("")
    return labels, reasons


def read_labels(traces: Dataset, label_column: str = "correct") -> list[bool | None]:
    """The labels of ``traces`` as ``True``/``False``/``None``, checked row by row.

    Accepted: booleans, integers 0/1, or a column of the strings ``"true"``/``"false"`` in any case
    (parsed, with one log line saying so). ``None`` is accepted only on a row whose ``verifier_error``
    says why the verifier raised (such a trace is excluded from pairs and SFT data). Anything else
    raises a ``ValueError`` naming the value and the row.
    """
    if label_column not in traces.column_names:
        raise ValueError(
            f"Column {label_column!r} is missing; the traces have {traces.column_names}. "
            "Label them first with label_traces(...) or pass label_column=..."
        )
    values = traces[label_column]
    errors = traces[ERROR_COLUMN] if ERROR_COLUMN in traces.column_names else [""] * len(values)
    strings = [v for v in values if isinstance(v, str)]
    if strings:
        logger.warning(
            "The %r column holds strings; reading %d 'true'/'false' values as booleans.", label_column, len(strings)
        )
    labels = []
    for row, (value, error) in enumerate(zip(values, errors)):
        where = f"{label_column!r} row {row}"
        if value is None:
            if not error:
                raise ValueError(
                    f"{where} has no label (None) and no {ERROR_COLUMN!r} saying why. Label every trace "
                    "(True/False), or relabel the traces with label_traces(...)."
                )
            labels.append(None)
        elif isinstance(value, str):
            if value.strip().lower() not in ("true", "false"):
                raise ValueError(
                    f"{where}: the label {value!r} is a string other than 'true'/'false'; store booleans in "
                    f"the {label_column!r} column, or drop it to label the traces with a verifier."
                )
            labels.append(value.strip().lower() == "true")
        else:
            labels.append(as_label(value, where))
    return labels


def check_labels(traces: Dataset, label_column: str = "correct") -> Dataset:
    """``traces`` with its ``label_column`` read by :func:`read_labels` and stored as booleans (``None`` kept)."""
    labels = read_labels(traces, label_column)
    return traces.remove_columns(label_column).add_column(label_column, labels)


def label_traces(
    dataset: Dataset,
    verifier: Verifier,
    completion_column: str = "completion",
    answer_column: str = "answer",
    label_column: str = "correct",
) -> Dataset:
    """Add a ``label_column`` saying whether ``verifier(completion, answer)`` accepts each trace.

    ``verifier`` is any callable ``(completion, answer) -> bool``: :func:`math_verify_checker` for
    boxed math answers, or a task's own checker (the toy task's is
    ``peft_trl_testbed.check_reasoning_answer``). A trace on which the verifier raises gets the label
    ``None`` and its reason in the ``verifier_error`` column: it is excluded from the pairs and the
    SFT data, and :func:`build_redi_pairs` counts it by reason. A result that is not a bool (or an
    int 0/1) raises, naming the value and the row (see :func:`verify_traces`).

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
    labels, reasons = verify_traces(dataset[completion_column], dataset[answer_column], verifier)
    failed = Counter(error_kind(r) for r in reasons if r)
    if failed:
        logger.warning(
            "The verifier raised on %d of %d traces (%s); they get no label and are excluded from the pairs.",
            sum(failed.values()),
            len(labels),
            ", ".join(f"{k}: {v}" for k, v in sorted(failed.items())),
        )
    dataset = dataset.remove_columns([c for c in (label_column, ERROR_COLUMN) if c in dataset.column_names])
    return dataset.add_column(label_column, labels).add_column(ERROR_COLUMN, reasons)


@dataclass
class PairReport:
    """What :func:`build_redi_pairs` kept, and what it dropped or excluded, by reason.

    ``dropped`` counts (prompt, answer) groups that gave no pair; ``excluded`` counts traces left
    out before pairing (the verifier raised on them, or the same completion was labelled both
    correct and incorrect).
    """

    prompts: int = 0
    pairs: int = 0
    dropped: Counter = field(default_factory=Counter)
    excluded: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        text = f"{self.pairs} pairs from {self.prompts} prompts; dropped {sum(self.dropped.values())} ({reasons})"
        if self.excluded:
            why = ", ".join(f"{k}: {v}" for k, v in sorted(self.excluded.items()))
            text += f"; excluded {sum(self.excluded.values())} traces ({why})"
        return text


def _same(completion) -> str:
    """A hashable form of a completion (a string, or a list of messages) to compare texts."""
    return completion if isinstance(completion, str) else json.dumps(completion, sort_keys=True, default=str)


def build_redi_pairs(
    traces: Dataset,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    label_column: str = "correct",
    min_length: int = 1,
    max_length: int | None = None,
    tokenizer=None,
    keep_columns: tuple[str, ...] = ("answer",),
    answer_column: str | None = "answer",
) -> tuple[Dataset, PairReport]:
    """Build (prompt, chosen, rejected) triplets from labelled teacher traces.

    Traces are grouped by prompt and reference answer (``answer_column``, when the traces have it),
    so two problems with the same text but different answers never share a pair. Per group (in
    order of first appearance) takes the first correct trace as ``chosen`` and the first incorrect
    one as ``rejected``, among traces whose length (tokens if a ``tokenizer`` is given, else
    characters) is within ``[min_length, max_length]``.

    Labels are read by :func:`read_labels` (booleans, 0/1, or "true"/"false" strings). Traces
    without a label (the verifier raised) are excluded, as are completions labelled both correct
    and incorrect within a group, so ``chosen != rejected`` always; both are counted by reason.

    Returns the pairs and a :class:`PairReport`: groups dropped by reason (``no correct trace``,
    ``no incorrect trace``, ``all traces filtered by length``, ``no labelled trace``) and traces
    excluded by reason.

    Example:
        ```py
        >>> from peft_trl_testbed import make_reasoning_traces
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
    if max_length is not None and (max_length < 1 or max_length < min_length):
        raise ValueError(
            f"max_length={max_length} keeps no trace (it must be at least 1 and at least min_length={min_length}); "
            "pass None for no limit."
        )

    def length(text) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if tokenizer else len(text)

    labels = read_labels(traces, label_column)
    errors = traces[ERROR_COLUMN] if ERROR_COLUMN in traces.column_names else [""] * len(traces)
    by_answer = answer_column is not None and answer_column in traces.column_names
    groups: OrderedDict = OrderedDict()
    extras = [c for c in keep_columns if c in traces.column_names]
    columns = [prompt_column, completion_column, *extras, *([answer_column] if by_answer else [])]
    report = PairReport()
    for row, label, error in zip(traces.select_columns(list(dict.fromkeys(columns))), labels, errors):
        key = (str(row[prompt_column]), str(row[answer_column]) if by_answer else None)
        group = groups.setdefault(key, {"prompt": row[prompt_column], "traces": [], **{c: row[c] for c in extras}})
        if label is None:
            report.excluded[error_kind(error)] += 1
        group["traces"].append((row[completion_column], label))

    report.prompts = len(groups)
    rows = {"prompt": [], "chosen": [], "rejected": [], **{c: [] for c in extras}}
    for group in groups.values():
        seen: dict[str, set] = {}
        for text, ok in group["traces"]:
            if ok is not None:
                seen.setdefault(_same(text), set()).add(ok)
        contradicted = {t for t, oks in seen.items() if len(oks) > 1}
        usable = []
        for text, ok in group["traces"]:
            if ok is None:
                continue
            if _same(text) in contradicted:
                report.excluded[CONTRADICTION] += 1
                continue
            usable.append((text, ok))
        kept = [
            (t, ok)
            for t, ok in usable
            if min_length <= length(t) <= (float("inf") if max_length is None else max_length)
        ]
        chosen = next((t for t, ok in kept if ok), None)
        rejected = next((t for t, ok in kept if not ok), None)
        if not usable:
            report.dropped["no labelled trace"] += 1
        elif not kept:
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
    """The correct traces only, as a prompt/completion SFT dataset (REDI's first stage).

    Labels are read by :func:`read_labels`; traces without a label (the verifier raised) are left out.
    """
    keep = [row for row, ok in enumerate(read_labels(traces, label_column)) if ok is True]
    return traces.select(keep).select_columns(
        [c for c in traces.column_names if c not in (label_column, ERROR_COLUMN)]
    )
