"""REDI's teacher pipeline: trace generation, labelling, pairing and its bad-input rules, on a few toy prompts."""

import re
from collections import Counter

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_trl_testbed.teacher as teacher_module
from peft_trl_testbed import (
    TeacherConfig,
    build_toy_tokenizer,
    make_reasoning_traces,
    pretrained_toy_model_path,
    teacher_metrics,
)
from trl_ext.redi import (
    generate_traces,
    label_traces,
    require_correct_traces,
    traces_to_pairs,
    verify_traces,
)

K = 3


@pytest.fixture(scope="module")
def teacher():
    path = pretrained_toy_model_path()
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _prompts(n=4, seed=3, chat=False) -> Dataset:
    ds = make_reasoning_traces(n, seed=seed, traces_per_prompt=1).select_columns(["prompt", "answer"])
    if chat:
        ds = Dataset.from_dict(
            {"prompt": [[{"role": "user", "content": p}] for p in ds["prompt"]], "answer": ds["answer"]}
        )
    return ds


def _has_digit_of_answer(completion, answer) -> bool:
    text = completion[-1]["content"] if isinstance(completion, list) else completion
    return str(answer)[-1] in text


@torch.no_grad()
def _greedy_one_by_one(model, tokenizer, text: str) -> str:
    """Reference: greedy decoding of one unpadded prompt."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=24,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("chat", [False, True])
def test_k_traces_per_prompt_columns_and_labels(teacher, chat):
    model, tokenizer = teacher
    prompts = _prompts(chat=chat)
    # At a near-zero temperature, sampling is greedy decoding: compare each batched, left-padded trace
    # with greedy decoding of its prompt alone.
    traces, report = generate_traces(
        model,
        prompts,
        _has_digit_of_answer,
        K,
        tokenizer=tokenizer,
        temperature=1e-6,
        max_new_tokens=24,
        batch_size=5,
        progress=False,
    )
    assert traces.column_names == ["prompt", "completion", "answer", "correct", "verifier_error"]
    assert len(traces) == K * len(prompts) and report.traces == len(traces) and report.prompts == len(prompts)
    for i, row in enumerate(traces):
        source = prompts[i // K]
        assert row["prompt"] == source["prompt"] and row["answer"] == source["answer"]
        if chat:
            assert [m["role"] for m in row["completion"]] == ["assistant"]
            text = tokenizer.apply_chat_template(source["prompt"], add_generation_prompt=True, tokenize=False)
            completion = row["completion"][0]["content"]
        else:
            text, completion = source["prompt"], row["completion"]
        assert completion == _greedy_one_by_one(model, tokenizer, text)
        assert row["correct"] == (str(row["answer"])[-1] in completion)
    assert report.correct == sum(traces["correct"]) and report.verifier_errors == 0
    assert report.backend == "transformers"


def test_sampling_is_seeded_and_labels_match_an_independent_checker(teacher):
    model, tokenizer = teacher
    prompts = _prompts(3)

    def answer_line(completion, answer):
        return bool(re.search(rf"Answer:\s*{answer}\b", completion))

    kwargs = dict(tokenizer=tokenizer, temperature=1.0, max_new_tokens=16, progress=False)
    a, _ = generate_traces(model, prompts, answer_line, K, seed=1, **kwargs)
    b, _ = generate_traces(model, prompts, answer_line, K, seed=1, **kwargs)
    c, _ = generate_traces(model, prompts, answer_line, K, seed=2, **kwargs)
    assert a["completion"] == b["completion"] and a["completion"] != c["completion"]
    assert a["correct"] == [bool(re.search(rf"Answer:\s*{y}\b", t)) for t, y in zip(a["completion"], a["answer"])]


def test_missing_answer_column_stops_before_loading_the_teacher(monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", no_loading)
    prompts = Dataset.from_dict({"prompt": ["Add 1 + 2 step by step.\n"], "solution": [3]})
    with pytest.raises(ValueError, match=r"no answer column 'answer'.*\['prompt', 'solution'\]"):
        generate_traces("/no/such/teacher", prompts, _has_digit_of_answer)
    with pytest.raises(ValueError, match="'prompt'"):
        generate_traces(
            "/no/such/teacher",
            prompts.rename_column("prompt", "question"),
            _has_digit_of_answer,
            answer_column="solution",
        )


def test_vllm_requested_without_gpu_is_a_clear_error(teacher):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    model, tokenizer = teacher
    with pytest.raises(ValueError, match="use_vllm=True"):
        generate_traces(model, _prompts(1), _has_digit_of_answer, tokenizer=tokenizer, use_vllm=True)


def test_a_raising_verifier_excludes_that_trace_and_is_counted_by_reason(teacher):
    model, tokenizer = teacher
    calls = []

    def flaky(completion, answer):
        calls.append(completion)
        if len(calls) == 2:
            raise RuntimeError("cannot parse this trace")
        return len(calls) != 3  # the third trace is a real negative

    traces, report = generate_traces(
        model, _prompts(2), flaky, K, tokenizer=tokenizer, max_new_tokens=8, progress=False
    )
    assert traces["correct"] == [True, None, False] + [True] * (2 * K - 3)
    assert traces["verifier_error"][1] == "verifier raised RuntimeError: cannot parse this trace"
    assert report.verifier_errors == 1 and report.verifier_error_reasons == {"verifier raised RuntimeError": 1}
    assert report.correct == 2 * K - 2 and "verifier raised on 1" in str(report)
    # The trace the verifier raised on is never a negative (pairing itself: tests/trl_ext/test_redi_data.py).
    _, data_report = traces_to_pairs(traces, report)
    assert data_report.pairs.excluded["verifier raised RuntimeError"] == 1
    assert "excluded 1 traces (verifier raised RuntimeError: 1)" in str(data_report)
    assert data_report.positives == 2 * K - 2
    # label_traces shares the rule
    calls.clear()
    labelled = label_traces(traces.remove_columns(["correct", "verifier_error"]), flaky)
    assert labelled["correct"] == traces["correct"] and labelled["verifier_error"] == traces["verifier_error"]
    assert verify_traces(["1", "x"], [1, 1], lambda c, a: int(c) == a) == (
        [True, None],
        ["", "verifier raised ValueError: invalid literal for int() with base 10: 'x'"],
    )


def test_no_correct_trace_is_a_clear_error_before_training(teacher):
    model, tokenizer = teacher
    traces, report = generate_traces(
        model, _prompts(2), lambda c, a: False, K, tokenizer=tokenizer, max_new_tokens=8, progress=False
    )
    assert report.correct == 0 and report.correct_fraction == 0.0
    with pytest.raises(ValueError, match=rf"no correct traces out of {2 * K}"):
        traces_to_pairs(traces, report)
    with pytest.raises(ValueError, match="no correct traces"):
        require_correct_traces(traces)


def _reference_pairs(traces, max_length=None):
    """Slow obvious reference: per prompt in order of first appearance, first correct and first incorrect trace."""
    prompts = list(dict.fromkeys(traces["prompt"]))
    pairs, dropped = [], Counter()
    for p in prompts:
        rows = [r for r in traces if r["prompt"] == p]
        rows = [r for r in rows if max_length is None or len(r["completion"]) <= max_length]
        good = [r["completion"] for r in rows if r["correct"]]
        bad = [r["completion"] for r in rows if not r["correct"]]
        if not rows:
            dropped["all traces filtered by length"] += 1
        elif not good:
            dropped["no correct trace"] += 1
        elif not bad:
            dropped["no incorrect trace"] += 1
        else:
            pairs.append((p, good[0], bad[0]))
    return pairs, dropped


@pytest.mark.parametrize("max_length", [None, 30])
def test_traces_to_pairs_matches_a_slow_reference(max_length):
    traces = make_reasoning_traces(40, seed=7, traces_per_prompt=4, p_correct=0.6)
    pairs, report = traces_to_pairs(traces, max_length=max_length)
    ref_pairs, ref_dropped = _reference_pairs(traces, max_length)
    assert list(zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])) == ref_pairs
    assert report.pairs.dropped == ref_dropped and report.positives == sum(traces["correct"])
    assert report.to_dict()["pairs"] == len(ref_pairs)
    assert sum(ref_dropped.values()) > 0  # the case exercises drops


def test_toy_teacher_is_cached_by_configuration(tmp_path, monkeypatch):
    monkeypatch.setattr(teacher_module, "cache_dir", lambda: tmp_path)
    trained = []
    real = teacher_module.train_toy_teacher
    monkeypatch.setattr(teacher_module, "train_toy_teacher", lambda *a, **k: trained.append(a) or real(*a, **k))
    config = TeacherConfig(num_train_prompts=8, num_eval_prompts=4, steps=2, batch_size=4)
    path = teacher_module.toy_teacher_path(config, progress=False)
    assert teacher_module.toy_teacher_path(config, progress=False) == path and len(trained) == 1
    assert path.startswith(str(tmp_path)) and set(teacher_metrics(path)) >= {
        "heldout_accuracy_greedy",
        "heldout_accuracy_sampled",
        "train_seconds",
    }
    AutoModelForCausalLM.from_pretrained(path)
    other = teacher_module.toy_teacher_path(
        TeacherConfig(num_train_prompts=8, num_eval_prompts=4, steps=3, batch_size=4), progress=False
    )
    assert other != path and len(trained) == 2


def test_the_callers_tokenizer_and_model_modes_are_restored_when_generation_raises(teacher, monkeypatch):
    model, tokenizer = teacher
    model.train()
    model.model.embed_tokens.eval()  # a frozen submodule in eval mode must stay so
    original, tokenizer.padding_side = tokenizer.padding_side, "right"  # generation switches to "left"
    padding_side = "right"

    def broken_generate(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "generate", broken_generate)
    modes = {name: m.training for name, m in model.named_modules()}
    with pytest.raises(RuntimeError, match="out of memory"):
        generate_traces(model, _prompts(1), _has_digit_of_answer, tokenizer=tokenizer, progress=False)
    assert tokenizer.padding_side == padding_side
    assert {name: m.training for name, m in model.named_modules()} == modes
    monkeypatch.undo()
    generate_traces(model, _prompts(1), _has_digit_of_answer, 1, tokenizer=tokenizer, max_new_tokens=2, progress=False)
    assert tokenizer.padding_side == padding_side and {n: m.training for n, m in model.named_modules()} == modes
    model.eval()
    tokenizer.padding_side = original


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens=0 must be a positive integer"),
        (dict(max_new_tokens=2.5), "max_new_tokens=2.5 must be a positive integer"),
        (dict(batch_size=0), "batch_size=0 must be a positive integer"),
        (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(temperature=float("nan")), "temperature=nan must be a positive finite number"),
        (dict(num_traces_per_prompt=True), "num_traces_per_prompt=True must be a positive integer"),
    ],
)
def test_generation_arguments_are_checked_before_the_teacher_loads(kwargs, match, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match=match):
        generate_traces("/no/such/teacher", _prompts(1), _has_digit_of_answer, **kwargs)


def test_generating_with_a_4bit_model_leaves_it_trainable(tmp_path):
    # bitsandbytes repacks 4-bit weights on an eval-mode forward on CPU (for a kernel that passes no gradient back,
    # with its scales rounded to bf16): a student that generates its own traces must stay as it was loaded
    from prefix_grouper_helpers import quantized_llama

    from peft_ext._quantized import repacked_4bit_layers

    model = quantized_llama("bnb_4bit", tmp_path)
    prompts = Dataset.from_list([{"prompt": "1 + 2 =", "answer": "3"}, {"prompt": "4 + 4 =", "answer": "8"}])
    kwargs = dict(tokenizer=build_toy_tokenizer(), max_new_tokens=4, progress=False, use_vllm=False)
    _, report = generate_traces(model, prompts, lambda completion, answer: answer in completion, 2, **kwargs)
    assert report.traces == 4
    assert repacked_4bit_layers(model) == [] and not model.training
