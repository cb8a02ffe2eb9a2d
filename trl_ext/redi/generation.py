"""REDI's data pipeline from a teacher: sample traces, label them with a verifier, pair them.

:func:`generate_traces` samples ``num_traces_per_prompt`` traces per prompt from a teacher (batched
``transformers`` ``generate``, or vLLM when it is installed and a GPU is present) and labels each
with a verifier. :func:`traces_to_pairs` turns the labelled traces into REDI's (prompt, chosen,
rejected) triplets with :func:`~trl_ext.redi.build_redi_pairs`, and stops with a clear error when
the teacher produced no correct trace at all. :func:`teacher_pipeline` runs both and saves
``traces/`` and ``pairs/`` under an output folder.

Example:
    ```py
    >>> from trl_ext.redi import generate_traces, math_verify_checker, traces_to_pairs
    >>> traces, report = generate_traces("my/teacher", problems, math_verify_checker, num_traces_per_prompt=4)
    >>> pairs, data_report = traces_to_pairs(traces, report)
    >>> print(data_report)
    ```
"""

from __future__ import annotations

import math
import numbers
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_ext._quantized import keep_4bit_training_layout, repacked_4bit_layers

from .data import (
    ERROR_COLUMN,
    PairReport,
    Verifier,
    build_redi_pairs,
    check_labels,
    error_kind,
    read_labels,
    verify_traces,
)


@dataclass
class TraceReport:
    """What :func:`generate_traces` produced: counts, verifier failures, backend and wall time.

    ``verifier_errors`` counts the traces on which the verifier raised (no label: excluded from the
    pairs and the SFT data), ``verifier_error_reasons`` the same by exception type.
    """

    prompts: int = 0
    traces: int = 0
    correct: int = 0
    verifier_errors: int = 0
    backend: str = "transformers"
    seconds: float = 0.0
    verifier_error_reasons: dict = field(default_factory=dict)

    @property
    def correct_fraction(self) -> float:
        """Fraction of traces the verifier accepted (0.0 when there are none)."""
        return self.correct / self.traces if self.traces else 0.0

    def to_dict(self) -> dict:
        """The counts as a JSON-ready dict, with ``correct_fraction``."""
        return {**asdict(self), "correct_fraction": self.correct_fraction}

    def __str__(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.verifier_error_reasons.items()))
        errors = f", verifier raised on {self.verifier_errors} ({why}; excluded)" if self.verifier_errors else ""
        return (
            f"{self.traces} traces for {self.prompts} prompts, {self.correct} correct "
            f"({self.correct_fraction:.1%}){errors}; {self.backend}, {self.seconds:.1f} s"
        )


@dataclass
class TeacherDataReport:
    """The teacher data of a REDI run: the traces (:class:`TraceReport`) and the pairs (:class:`PairReport`).

    ``positives`` counts the correct traces (the SFT stage's data).
    """

    traces: TraceReport | None = None
    pairs: PairReport = field(default_factory=PairReport)
    positives: int = 0

    def to_dict(self) -> dict:
        """Trace counts, positives, pairs, prompts and drops by reason, as a JSON-ready dict."""
        return {
            "traces": self.traces.to_dict() if self.traces else None,
            "positives": self.positives,
            "pairs": self.pairs.pairs,
            "prompts": self.pairs.prompts,
            "dropped": dict(self.pairs.dropped),
            "excluded": dict(self.pairs.excluded),
        }

    def __str__(self) -> str:
        head = f"{self.traces}\n" if self.traces else ""
        return f"{head}{self.positives} correct traces for SFT; {self.pairs}"


def _is_conversational(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


def _vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def _load_teacher(teacher, tokenizer):
    """(model or path, tokenizer, path or None) for a path/Hub id or a loaded model."""
    if isinstance(teacher, (str, os.PathLike)):
        path = str(teacher)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
        return None, tokenizer, path
    if tokenizer is None:
        name = getattr(teacher, "name_or_path", None)
        if not name:
            raise ValueError("teacher is a model object without a name_or_path; pass tokenizer=... as well.")
        tokenizer = AutoTokenizer.from_pretrained(name)
    return teacher, tokenizer, None


def _transformers_generate(model, tokenizer, texts, k, temperature, top_p, max_new_tokens, batch_size, progress):
    if not repacked_4bit_layers(model):  # generating must not repack the 4-bit weights of a model trained later
        keep_4bit_training_layout(model)
    modes = [(module, module.training) for module in model.modules()]  # per module: some may be frozen in eval
    padding_side = tokenizer.padding_side
    try:
        model.eval()
        tokenizer.padding_side = "left"  # generation continues on the right
        return _generate_batches(model, tokenizer, texts, k, temperature, top_p, max_new_tokens, batch_size, progress)
    finally:  # the caller's model and tokenizer as they were, also when generation raises
        tokenizer.padding_side = padding_side
        for module, training in modes:
            module.training = training


def _generate_batches(model, tokenizer, texts, k, temperature, top_p, max_new_tokens, batch_size, progress):
    from tqdm.auto import tqdm

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Stop at the tokenizer's end token and at the model's own (chat models end a turn with another token).
    eos = model.generation_config.eos_token_id
    eos = sorted({tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None})
    per_call = max(1, batch_size // k)  # prompts per generate call; each is sampled k times
    out_texts = []
    with tqdm(total=len(texts) * k, desc="generating traces", unit="trace", disable=not progress) as bar:
        for start in range(0, len(texts), per_call):
            enc = tokenizer(
                texts[start : start + per_call], return_tensors="pt", padding=True, add_special_tokens=False
            )
            enc = enc.to(model.device)
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    do_sample=True,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=0,  # plain temperature / nucleus sampling, not generation_config's top-k default
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=k,
                    pad_token_id=pad_id,
                    eos_token_id=eos,
                )
            out_texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            bar.update(out.shape[0])
    return [out_texts[i * k : (i + 1) * k] for i in range(len(texts))]


def _vllm_generate(path, texts, k, temperature, top_p, max_new_tokens, seed, progress):
    from vllm import LLM, SamplingParams  # optional; imported only on this path

    llm = LLM(model=path, seed=seed)
    params = SamplingParams(n=k, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed)
    return [[o.text for o in out.outputs] for out in llm.generate(texts, params, use_tqdm=progress)]


def generate_traces(
    teacher,
    dataset: Dataset,
    verifier: Verifier,
    num_traces_per_prompt: int = 4,
    *,
    tokenizer=None,
    temperature: float = 0.8,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    batch_size: int = 64,
    seed: int = 0,
    use_vllm: bool | None = None,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    progress: bool = True,
) -> tuple[Dataset, TraceReport]:
    """Sample ``num_traces_per_prompt`` traces per prompt from ``teacher`` and label each with ``verifier``.

    Args:
        teacher: a model path or Hub id, or a loaded causal LM (then pass ``tokenizer`` unless the
            model's ``name_or_path`` has one).
        dataset: prompts in ``prompt_column`` (plain strings, or conversational message lists, which
            are rendered with the tokenizer's chat template) and reference answers in ``answer_column``.
        verifier: ``verifier(completion, answer) -> bool``, e.g. :func:`~trl_ext.redi.math_verify_checker`.
            A trace on which it raises gets no label (``correct`` is ``None``, the reason in
            ``verifier_error``): it is excluded from the pairs and counted in the report. A result
            that is not a bool (or an int 0/1) raises, naming the value and the row.
        use_vllm: ``None`` uses vLLM when it is installed and a CUDA GPU is present (and ``teacher`` is
            a path); ``False`` always uses ``transformers`` ``generate``.

    Returns:
        A dataset with columns ``prompt``, ``completion`` (a string, or an assistant message list for
        conversational prompts), ``answer``, ``correct`` and ``verifier_error``, traces of one prompt
        in consecutive rows; and a :class:`TraceReport`. The caller's model keeps its train/eval mode
        and its tokenizer its padding side, also when generation raises.

    Example:
        ```py
        >>> from peft_trl_testbed import check_reasoning_answer, make_reasoning_traces, toy_teacher_path
        >>> prompts = make_reasoning_traces(64, traces_per_prompt=1).select_columns(["prompt", "answer"])
        >>> traces, report = generate_traces(toy_teacher_path(), prompts, check_reasoning_answer, max_new_tokens=48)
        >>> print(report)
        ```
    """
    # Every check on the inputs comes before loading a model.
    for col in (prompt_column, answer_column):
        if col not in dataset.column_names:
            raise ValueError(
                f"The prompts have no {col!r} column (they have {dataset.column_names}); traces cannot be "
                f"generated and labelled without it. Rename the column or pass {col.split('_')[0]}_column=..."
                if col == prompt_column
                else f"The prompts have no answer column {col!r} (they have {dataset.column_names}); the "
                "verifier needs a reference answer per prompt. Add one or pass answer_column=..."
            )
    if not callable(verifier):
        raise TypeError(f"verifier={verifier!r} is not callable; pass a function (completion, answer) -> bool.")
    if (
        not isinstance(num_traces_per_prompt, int)
        or isinstance(num_traces_per_prompt, bool)
        or num_traces_per_prompt < 1
    ):
        raise ValueError(f"num_traces_per_prompt={num_traces_per_prompt!r} must be a positive integer, e.g. 4.")
    check_generation_args(
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        use_vllm=use_vllm,
    )
    if len(dataset) == 0:
        raise ValueError("The prompt dataset is empty; there is nothing to generate.")
    if use_vllm and not _vllm_available():
        raise ValueError("use_vllm=True, but vLLM is not installed or no CUDA GPU is present; pass use_vllm=None.")

    start = time.perf_counter()
    model, tokenizer, path = _load_teacher(teacher, tokenizer)
    prompts, answers = dataset[prompt_column], dataset[answer_column]
    chat = [_is_conversational(p) for p in prompts]
    texts = [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) if c else p
        for p, c in zip(prompts, chat)
    ]
    vllm = (use_vllm if use_vllm is not None else _vllm_available()) and path is not None
    k = num_traces_per_prompt
    if vllm:
        outputs = _vllm_generate(path, texts, k, temperature, top_p, max_new_tokens, seed, progress)
    else:
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(path)
            if torch.cuda.is_available():
                model = model.to("cuda")
        cuda = [model.device.index or 0] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # seeded sampling without touching the caller's RNG state
            torch.manual_seed(seed)
            outputs = _transformers_generate(
                model, tokenizer, texts, k, temperature, top_p, max_new_tokens, batch_size, progress
            )

    rows = {"prompt": [], "completion": [], "answer": []}
    for prompt, answer, is_chat, samples in zip(prompts, answers, chat, outputs):
        for text in samples:
            rows["prompt"].append(prompt)
            rows["completion"].append([{"role": "assistant", "content": text}] if is_chat else text)
            rows["answer"].append(answer)
    rows["correct"], rows[ERROR_COLUMN] = verify_traces(rows["completion"], rows["answer"], verifier)
    reasons = Counter(error_kind(r) for r in rows[ERROR_COLUMN] if r)
    report = TraceReport(
        prompts=len(prompts),
        traces=len(rows["prompt"]),
        correct=sum(ok is True for ok in rows["correct"]),
        verifier_errors=sum(reasons.values()),
        verifier_error_reasons=dict(reasons),
        backend="vllm" if vllm else "transformers",
        seconds=time.perf_counter() - start,
    )
    return Dataset.from_dict(rows), report


def check_generation_args(
    temperature: float = 0.8,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    batch_size: int = 64,
    seed: int = 0,
    use_vllm: bool | None = None,
) -> None:
    """Raise a ``ValueError`` naming the value and the fix for a sampling argument that cannot work.

    :func:`generate_traces` calls it before the teacher loads; the REDI recipe calls it before any work.
    """

    def positive_int(name, value):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer.")

    positive_int("max_new_tokens", max_new_tokens)
    positive_int("batch_size", batch_size)
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise ValueError(f"seed={seed!r} must be an integer.")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not 0 < temperature < math.inf:
        raise ValueError(
            f"temperature={temperature!r} must be a positive finite number: traces are sampled (the paper used 0.6-1.0)."
        )
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]; 1.0 samples from the whole distribution.")
    if use_vllm not in (None, True, False):
        raise ValueError(f"use_vllm={use_vllm!r} must be None (automatic), True or False.")


def require_correct_traces(traces: Dataset, label_column: str = "correct") -> int:
    """Raise unless some trace is correct; return the number of correct traces.

    Training on a teacher's data with no correct trace has nothing to imitate, so this stops a run
    before any training.
    """
    labels = read_labels(traces, label_column)
    correct = sum(ok is True for ok in labels)
    if correct == 0:
        unlabelled = sum(ok is None for ok in labels)
        raised = f" (the verifier raised on {unlabelled} of them)" if unlabelled else ""
        raise ValueError(
            f"The teacher produced no correct traces out of {len(traces)}{raised}; there is nothing to fine-tune on "
            "and no pair to build. Check the verifier and the answer column on a few traces, raise max_new_tokens if "
            "traces are cut off, sample more traces per prompt, or use a stronger teacher."
        )
    return correct


def traces_to_pairs(
    traces: Dataset, trace_report: TraceReport | None = None, max_length: int | None = None, tokenizer=None
) -> tuple[Dataset, TeacherDataReport]:
    """REDI pairs from labelled traces (first correct and first incorrect trace per prompt).

    Raises a ``ValueError`` when no trace is correct (see :func:`require_correct_traces`). Pairs and
    drops by reason are those of :func:`~trl_ext.redi.build_redi_pairs`.

    Example:
        ```py
        >>> pairs, report = traces_to_pairs(traces, trace_report)
        >>> report.to_dict()["dropped"]
        ```
    """
    traces = check_labels(traces)  # read once: a "true"/"false" string column is logged once
    correct = require_correct_traces(traces)
    pairs, pair_report = build_redi_pairs(traces, max_length=max_length, tokenizer=tokenizer)
    return pairs, TeacherDataReport(traces=trace_report, pairs=pair_report, positives=correct)


def teacher_pipeline(
    teacher,
    dataset: Dataset,
    verifier: Verifier,
    output_dir: str | os.PathLike,
    num_traces_per_prompt: int = 4,
    max_length: int | None = None,
    **generate_kwargs,
) -> tuple[Dataset, Dataset, TeacherDataReport]:
    """Generate, label and pair; save ``traces/`` and ``pairs/`` under ``output_dir`` with ``save_to_disk``.

    Returns the traces, the pairs and a :class:`TeacherDataReport`; ``positives(traces)`` is the SFT set.

    Example:
        ```py
        >>> traces, pairs, report = teacher_pipeline("my/teacher", problems, math_verify_checker, "out")
        ```
    """
    traces, trace_report = generate_traces(teacher, dataset, verifier, num_traces_per_prompt, **generate_kwargs)
    traces.save_to_disk(os.path.join(output_dir, "traces"))
    pairs, report = traces_to_pairs(traces, trace_report, max_length=max_length)
    pairs.save_to_disk(os.path.join(output_dir, "pairs"))
    return traces, pairs, report


__all__ = [
    "check_generation_args",
    "TeacherDataReport",
    "TraceReport",
    "generate_traces",
    "require_correct_traces",
    "teacher_pipeline",
    "traces_to_pairs",
]
