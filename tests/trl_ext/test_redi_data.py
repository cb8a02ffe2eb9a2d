"""REDI's data tooling (``trl_ext.redi.data``): labels are real booleans, a raising verifier never makes a
negative, and groups are keyed by prompt and answer, each checked against a slow obvious reference."""

import logging
import re
from collections import Counter

import numpy as np
import pytest
from datasets import Dataset

from peft_trl_testbed import check_reasoning_answer, make_reasoning_traces
from trl_ext.redi import (
    as_label,
    build_redi_pairs,
    label_traces,
    math_verify_checker,
    positives,
    read_labels,
    traces_to_pairs,
)

ROWS = [  # prompt, answer, completion; the verifier below accepts "x=<answer>"
    ("Solve x + 1 = 4.", 3, "x=3"),
    ("Solve x + 1 = 4.", 3, "x=5"),
    ("Solve x + 1 = 4.", 3, "boom"),  # the verifier raises: a correct-looking trace must not become a negative
    ("Solve x + 2 = 4.", 2, "boom"),
    ("Solve x + 2 = 4.", 2, "x=2"),
    ("Solve x + 2 = 4.", 2, "x=9"),
]


def _traces(rows=ROWS) -> Dataset:
    return Dataset.from_dict(
        {"prompt": [r[0] for r in rows], "answer": [r[1] for r in rows], "completion": [r[2] for r in rows]}
    )


def _verifier(completion, answer):
    if completion == "boom":
        raise KeyError("unparsable")
    return completion == f"x={answer}"


def _reference_pairs(rows, labels):
    """Slow obvious reference: per (prompt, answer) in order, first correct and first incorrect labelled trace."""
    keys = list(dict.fromkeys((p, a) for p, a, _ in rows))
    out = []
    for key in keys:
        group = [(c, ok) for (p, a, c), ok in zip(rows, labels) if (p, a) == key and ok is not None]
        good = [c for c, ok in group if ok]
        bad = [c for c, ok in group if not ok]
        if good and bad:
            out.append((key[0], good[0], bad[0]))
    return out


def test_a_raising_verifier_excludes_the_trace_from_pairs_and_sft_and_counts_it():
    labelled = label_traces(_traces(), _verifier)
    assert labelled["correct"] == [True, False, None, None, True, False]
    assert labelled["verifier_error"][2] == "verifier raised KeyError: 'unparsable'"
    pairs, report = build_redi_pairs(labelled)
    labels = [_verifier(c, a) if c != "boom" else None for _, a, c in ROWS]
    assert list(zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])) == _reference_pairs(ROWS, labels)
    assert "boom" not in pairs["rejected"] and "boom" not in pairs["chosen"]
    assert report.excluded == Counter({"verifier raised KeyError": 2}) and report.pairs == 2
    assert "excluded 2 traces (verifier raised KeyError: 2)" in str(report)
    assert positives(labelled)["completion"] == ["x=3", "x=2"]
    assert "verifier_error" not in positives(labelled).column_names
    # A saved and reloaded trace set keeps the reason, so a later run counts it the same way.
    _, again = traces_to_pairs(labelled)
    assert again.pairs.excluded == report.excluded and again.to_dict()["excluded"] == {"verifier raised KeyError": 2}


@pytest.mark.parametrize("result", ["False", "True", 0.2, 1.0, None, [True], 2])
def test_a_verifier_result_that_is_not_a_bool_is_refused_naming_value_and_row(result):
    def verifier(completion, answer):
        return result if completion == "x=5" else True

    with pytest.raises(ValueError, match=rf"row 1 \(completion .x=5.\).*label {re.escape(repr(result))}") as err:
        label_traces(_traces(), verifier)
    assert "is not a bool" in str(err.value)


def test_int_and_numpy_labels_are_accepted():
    assert [as_label(v, "row") for v in (True, False, 1, 0, np.bool_(True), np.int64(0))] == [
        True,
        False,
        True,
        False,
        True,
        False,
    ]
    labelled = label_traces(_traces(ROWS[:2]), lambda c, a: int(c == f"x={a}"))
    assert labelled["correct"] == [True, False]


def test_a_column_of_true_false_strings_is_parsed_with_one_log_line(caplog):
    rows = [r for r in ROWS if r[2] != "boom"]
    labels = [c == f"x={a}" for _, a, c in rows]
    as_bools = _traces(rows).add_column("correct", labels)
    as_strings = _traces(rows).add_column("correct", ["TRUE" if ok else "false" for ok in labels])
    with caplog.at_level(logging.WARNING, logger="trl_ext.redi.data"):
        pairs, report = traces_to_pairs(as_strings)
    assert [r.getMessage() for r in caplog.records] == [
        "The 'correct' column holds strings; reading 4 'true'/'false' values as booleans."
    ]
    expected, _ = build_redi_pairs(as_bools)
    assert pairs.to_list() == expected.to_list() and report.pairs.pairs == 2 == len(_reference_pairs(rows, labels))
    assert positives(as_strings)["completion"] == ["x=3", "x=2"]  # "false" is not read as True


@pytest.mark.parametrize(
    "column, match",
    [
        (["True", "no", "True", "False"], r"'correct' row 1: the label 'no' is a string other than 'true'/'false'"),
        ([1.0, 0.0, 1.0, 0.0], r"'correct' row 0: the label 1.0 \(float\) is not a bool"),
        ([True, None, True, False], r"'correct' row 1 has no label \(None\) and no 'verifier_error'"),
    ],
)
def test_a_correct_column_that_is_not_booleans_is_refused(column, match):
    traces = _traces([r for r in ROWS if r[2] != "boom"]).add_column("correct", column)
    with pytest.raises(ValueError, match=match):
        build_redi_pairs(traces)
    with pytest.raises(ValueError, match=match):
        read_labels(traces)


def test_duplicate_prompt_texts_with_different_answers_never_share_a_pair():
    # Two problems with one text (e.g. a template whose numbers were stripped) and different answers:
    # "x=3" is right for the first and wrong for the second.
    rows = [
        ("Solve for x.", 3, "x=3"),
        ("Solve for x.", 3, "x=1"),
        ("Solve for x.", 4, "x=3"),
        ("Solve for x.", 4, "x=4"),
    ]
    traces = label_traces(_traces(rows), _verifier)
    pairs, report = build_redi_pairs(traces)
    assert list(zip(pairs["chosen"], pairs["rejected"], pairs["answer"])) == [("x=3", "x=1", 3), ("x=4", "x=3", 4)]
    assert report.prompts == 2 and all(c != r for c, r in zip(pairs["chosen"], pairs["rejected"]))


def test_a_completion_labelled_both_ways_in_one_group_is_excluded_and_counted():
    rows = [("p", 1, "a"), ("p", 1, "b"), ("p", 1, "a"), ("q", 2, "c"), ("q", 2, "d")]
    traces = _traces(rows).add_column("correct", [True, True, False, True, False])
    pairs, report = build_redi_pairs(traces)
    # "a" is both correct and incorrect for ("p", 1): the verifier is inconsistent, so neither label is used;
    # the group is left with "b" (correct) only.
    assert list(zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])) == [("q", "c", "d")]
    assert report.excluded == {"same completion labelled both correct and incorrect": 2}
    assert report.dropped == {"no incorrect trace": 1}


@pytest.mark.parametrize("max_length", [0, -3])
def test_a_max_length_that_keeps_no_trace_is_refused_not_ignored(max_length):
    traces = Dataset.from_dict(
        {"prompt": ["p", "p"], "completion": ["x=3", "long wrong"], "answer": ["3", "3"], "correct": [True, False]}
    )
    with pytest.raises(ValueError, match=rf"max_length={max_length} keeps no trace.*pass None for no limit"):
        build_redi_pairs(traces, min_length=0, max_length=max_length)
    pairs, _ = build_redi_pairs(traces, min_length=0, max_length=4)  # the limit applies: "long wrong" is too long
    assert len(pairs) == 0


def _slow_pairs(rows):
    """Obvious reference: loop over prompts in order of appearance."""
    order, out, reasons = [], [], {}
    for r in rows:
        if r["prompt"] not in order:
            order.append(r["prompt"])
    for p in order:
        mine = [r for r in rows if r["prompt"] == p and 3 <= len(r["completion"]) <= 12]
        good = [r["completion"] for r in mine if r["correct"]]
        bad = [r["completion"] for r in mine if not r["correct"]]
        if not mine:
            reasons["all traces filtered by length"] = reasons.get("all traces filtered by length", 0) + 1
        elif not good:
            reasons["no correct trace"] = reasons.get("no correct trace", 0) + 1
        elif not bad:
            reasons["no incorrect trace"] = reasons.get("no incorrect trace", 0) + 1
        else:
            out.append((p, good[0], bad[0]))
    return out, reasons


def test_build_pairs_matches_slow_reference():
    rows = [
        {"prompt": "p1", "completion": "wrong1", "correct": False},
        {"prompt": "p1", "completion": "right1", "correct": True},
        {"prompt": "p1", "completion": "right2", "correct": True},
        {"prompt": "p2", "completion": "ok", "correct": True},  # too short
        {"prompt": "p2", "completion": "right-long-enough", "correct": True},  # too long
        {"prompt": "p3", "completion": "right3", "correct": True},
        {"prompt": "p4", "completion": "wrong4", "correct": False},
        {"prompt": "p5", "completion": "bad5", "correct": False},
        {"prompt": "p5", "completion": "good5", "correct": True},
    ]
    pairs, report = build_redi_pairs(Dataset.from_list(rows), min_length=3, max_length=12, keep_columns=())
    expected, reasons = _slow_pairs(rows)
    assert list(zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])) == expected
    assert (
        dict(report.dropped)
        == reasons
        == {
            "all traces filtered by length": 1,
            "no incorrect trace": 1,
            "no correct trace": 1,
        }
    )
    assert report.prompts == 5 and report.pairs == 2


def test_toy_traces_pairs_verify():
    traces = make_reasoning_traces(60, seed=3)
    relabelled = label_traces(traces.remove_columns("correct"), verifier=check_reasoning_answer)
    assert relabelled["correct"] == traces["correct"]
    pairs, report = build_redi_pairs(relabelled)
    assert report.pairs + sum(report.dropped.values()) == 60
    assert all(check_reasoning_answer(c, a) == 1.0 for c, a in zip(pairs["chosen"], pairs["answer"]))
    assert not any(check_reasoning_answer(r, a) == 1.0 for r, a in zip(pairs["rejected"], pairs["answer"]))
    sft = positives(relabelled)
    assert "correct" not in sft.column_names
    expected = [c for c, ok in zip(traces["completion"], traces["correct"]) if ok]
    assert 0 < len(expected) < len(traces)
    assert sft["completion"] == expected
    assert all(check_reasoning_answer(c, a) == 1.0 for c, a in zip(sft["completion"], sft["answer"]))


def test_label_traces_takes_any_callable_and_refuses_names():
    traces = make_reasoning_traces(10, seed=4).remove_columns("correct")
    labelled = label_traces(
        traces, verifier=lambda completion, answer: completion.rstrip().endswith(f"Answer: {answer}")
    )
    assert labelled["correct"] == [
        check_reasoning_answer(c, a) == 1.0 for c, a in zip(traces["completion"], traces["answer"])
    ]
    with pytest.raises(TypeError, match="verifier='toy' is not callable"):
        label_traces(traces, verifier="toy")


def test_math_verify_labels_boxed_answers():
    pytest.importorskip("math_verify")
    assert math_verify_checker(r"so x = \boxed{\frac{1}{2}}", "0.5")
    assert not math_verify_checker(r"so x = \boxed{3}", "0.5")
    assert math_verify_checker(r"\boxed{42}", 42)
    traces = Dataset.from_dict({"completion": [r"\boxed{7}", r"\boxed{8}"], "answer": ["7", "7"]})
    assert label_traces(traces, verifier=math_verify_checker)["correct"] == [True, False]
