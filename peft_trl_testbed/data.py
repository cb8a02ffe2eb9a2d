"""Small synthetic datasets with verifiable answers, in TRL's standard formats.

- (a) arithmetic: :func:`make_arithmetic_dataset` + :func:`arithmetic_reward`;
- (b) step-by-step reasoning traces, correct and wrong: :func:`make_reasoning_traces`,
  :func:`make_reasoning_preferences` + :func:`check_reasoning_answer`;
- (c) mixed-quality SFT data: :func:`make_mixed_quality_sft`;
- (d) random UUID key -> value pairs: :func:`make_uuid_dataset` + :func:`uuid_char_accuracy`.

Every builder is deterministic in ``seed``; held-out splits use a different seed and are
disjoint from training problems.
"""

from __future__ import annotations

import random
import re
import uuid

from datasets import Dataset

ANSWER_RE = re.compile(r"-?\d+")
DEFAULT_MAX_OPERAND = 50  # operands 0..50: 2,601 distinct problems


def _text(completion) -> str:
    """Completion text from either a plain string or a conversational message list."""
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return completion


def extract_int(text: str) -> int | None:
    """First integer in ``text`` (the toy tasks' answer format), or None."""
    match = ANSWER_RE.search(text)
    return int(match.group()) if match else None


# --------------------------------------------------------------------------- (a)
def arithmetic_problem(rng: random.Random, max_operand: int) -> tuple[str, int]:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    return f"{a}+{b}=", a + b


def make_arithmetic_dataset(
    n: int = 512,
    seed: int = 0,
    max_operand: int = DEFAULT_MAX_OPERAND,
    conversational: bool = False,
    exclude: Dataset | None = None,
) -> Dataset:
    """Addition problems ``"a+b="`` -> ``"c"`` with an ``answer`` column.

    Plain form has string ``prompt``/``completion``; conversational form has message lists.
    Pass the training set as ``exclude`` to get a disjoint held-out set.

    Example:
        ```py
        >>> ds = make_arithmetic_dataset(4, seed=0)
        >>> ds[0]["prompt"], ds[0]["completion"], ds[0]["answer"]
        ('24+48=', '72', 72)
        ```
    """
    if n <= 0:
        raise ValueError(f"n={n} must be a positive number of examples.")
    seen = set()
    if exclude is not None:
        seen = {p[-1]["content"] if isinstance(p, list) else p for p in exclude["prompt"]}
    total = (max_operand + 1) ** 2
    if n > total - len(seen):
        raise ValueError(
            f"n={n} exceeds the {total - len(seen)} distinct problems available with max_operand={max_operand}; "
            "raise max_operand or ask for fewer."
        )
    rng = random.Random(seed)
    rows, used = [], set(seen)
    while len(rows) < n:
        prompt, answer = arithmetic_problem(rng, max_operand)
        if prompt in used:
            continue
        used.add(prompt)
        rows.append((prompt, answer))
    if conversational:
        return Dataset.from_dict(
            {
                "prompt": [[{"role": "user", "content": p}] for p, _ in rows],
                "completion": [[{"role": "assistant", "content": str(a)}] for _, a in rows],
                "answer": [a for _, a in rows],
            }
        )
    return Dataset.from_dict(
        {"prompt": [p for p, _ in rows], "completion": [str(a) for _, a in rows], "answer": [a for _, a in rows]}
    )


def arithmetic_reward(completions, answer, **kwargs) -> list[float]:
    """TRL reward function: 1.0 when the completion's first integer equals ``answer``, else 0.0.

    Works with plain and conversational completions; ``answer`` comes from the dataset column.
    """
    return [float(extract_int(_text(c)) == int(a)) for c, a in zip(completions, answer)]


# --------------------------------------------------------------------------- (b)
def _trace(rng: random.Random, terms: list[int], wrong: bool) -> tuple[str, int]:
    """Running-sum trace; a wrong trace makes one arithmetic slip that propagates."""
    slip = rng.randrange(1, len(terms)) if wrong else -1
    total, lines = terms[0], []
    for i, t in enumerate(terms[1:], start=1):
        new = total + t
        if i == slip:
            new += rng.choice([-10, -2, -1, 1, 2, 10])
        lines.append(f"{total}+{t}={new}")
        total = new
    lines.append(f"Answer: {total}")
    return "\n".join(lines), total


def make_reasoning_traces(
    n_prompts: int = 256, seed: int = 0, traces_per_prompt: int = 4, p_correct: float = 0.5, max_operand: int = 12
) -> Dataset:
    """Teacher traces with correctness labels: columns prompt, completion, answer, correct.

    Each prompt asks for the sum of 3-4 numbers (each at most ``max_operand``, so running sums
    stay within the range the pretrained toy model can add); each trace sums step by step. A trace is
    wrong with probability ``1 - p_correct`` (one slipped step). ``correct`` is what
    :func:`check_reasoning_answer` says, so labels are verifiable.
    """
    rng = random.Random(seed)
    rows = {"prompt": [], "completion": [], "answer": [], "correct": []}
    for _ in range(n_prompts):
        terms = [rng.randint(1, max_operand) for _ in range(rng.choice([3, 4]))]
        prompt = "Add " + " + ".join(map(str, terms)) + " step by step.\n"
        answer = sum(terms)
        for _ in range(traces_per_prompt):
            text, _ = _trace(rng, terms, wrong=rng.random() >= p_correct)
            rows["prompt"].append(prompt)
            rows["completion"].append(text)
            rows["answer"].append(answer)
            rows["correct"].append(check_reasoning_answer(text, answer) == 1.0)
    return Dataset.from_dict(rows)


def check_reasoning_answer(completion, answer) -> bool:
    """Whether the trace's ``Answer: N`` line equals ``answer`` (a REDI verifier: it returns a real bool)."""
    match = re.search(r"Answer:\s*(-?\d+)", _text(completion))
    return match is not None and int(match.group(1)) == int(answer)


def reasoning_reward(completions, answer, **kwargs) -> list[float]:
    """TRL reward function for reasoning traces (see :func:`check_reasoning_answer`)."""
    return [float(check_reasoning_answer(c, a)) for c, a in zip(completions, answer)]


def make_reasoning_preferences(n_prompts: int = 256, seed: int = 0, max_operand: int = 12) -> Dataset:
    """Preference pairs (prompt, chosen=correct trace, rejected=wrong trace) plus ``answer``."""
    rng = random.Random(seed)
    rows = {"prompt": [], "chosen": [], "rejected": [], "answer": []}
    for _ in range(n_prompts):
        terms = [rng.randint(1, max_operand) for _ in range(rng.choice([3, 4]))]
        rows["prompt"].append("Add " + " + ".join(map(str, terms)) + " step by step.\n")
        rows["chosen"].append(_trace(rng, terms, wrong=False)[0])
        rows["rejected"].append(_trace(rng, terms, wrong=True)[0])
        rows["answer"].append(sum(terms))
    return Dataset.from_dict(rows)


# --------------------------------------------------------------------------- (c)
QUALITIES = ("clean", "noise", "easy", "hard")


def make_mixed_quality_sft(
    n: int = 512,
    seed: int = 0,
    mix: tuple[float, float, float, float] = (0.4, 0.2, 0.2, 0.2),
    max_operand: int = DEFAULT_MAX_OPERAND,
) -> Dataset:
    """Mixed-quality SFT set: columns prompt, completion, answer (true), quality.

    - ``clean``: ordinary addition, correct label;
    - ``noise``: ordinary addition with a wrong label (``completion != answer``);
    - ``easy``: ``a+0=`` problems, trivially easy;
    - ``hard``: three-digit multiplication, far beyond a tiny model.
    """
    if abs(sum(mix) - 1.0) > 1e-6 or any(m < 0 for m in mix):
        raise ValueError(f"mix={mix} must be four non-negative fractions summing to 1 (clean, noise, easy, hard).")
    rng = random.Random(seed)
    rows = {"prompt": [], "completion": [], "answer": [], "quality": []}
    for _ in range(n):
        quality = rng.choices(QUALITIES, weights=mix)[0]
        if quality == "hard":
            a, b = rng.randint(100, 999), rng.randint(100, 999)
            prompt, answer = f"{a}*{b}=", a * b
        elif quality == "easy":
            a = rng.randint(0, max_operand)
            prompt, answer = f"{a}+0=", a
        else:
            prompt, answer = arithmetic_problem(rng, max_operand)
        label = answer
        if quality == "noise":
            label = answer + rng.choice([-3, -2, -1, 1, 2, 3, 7, 11])
        rows["prompt"].append(prompt)
        rows["completion"].append(str(label))
        rows["answer"].append(answer)
        rows["quality"].append(quality)
    return Dataset.from_dict(rows)


# --------------------------------------------------------------------------- (d)
def make_uuid_dataset(n: int = 256, seed: int = 0) -> Dataset:
    """Random UUID key -> value pairs for memorisation: prompt ``"<key>:"``, completion ``"<value>"``."""
    rng = random.Random(seed)
    keys = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]
    values = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]
    return Dataset.from_dict({"prompt": [k + ":" for k in keys], "completion": values, "answer": values})


def uuid_char_accuracy(completions, answer, **kwargs) -> list[float]:
    """Fraction of characters of each value reproduced at the right position (0..1)."""
    scores = []
    for c, a in zip(completions, answer):
        text = _text(c)
        scores.append(sum(x == y for x, y in zip(text, a)) / len(a))
    return scores
