"""The toy testbed: tokenizer, datasets with verifiable answers, bad input, pretraining."""

import re
import string

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_trl_testbed import (
    PretrainConfig,
    ToyModelSpec,
    arithmetic_reward,
    build_toy_tokenizer,
    check_reasoning_answer,
    make_arithmetic_dataset,
    make_mixed_quality_sft,
    make_reasoning_preferences,
    make_reasoning_traces,
    make_uuid_dataset,
    pretrain_datasets,
    pretrain_metrics,
    pretrained_toy_model_path,
    reasoning_reward,
    toy_model_path,
    uuid_char_accuracy,
)


def test_tokenizer_round_trip_and_specials(tmp_path):
    tok = build_toy_tokenizer()
    text = "Add 12 + 7 step by step.\n12+7=19\nAnswer: 19 {uuid: e3e70682-c209}" + string.punctuation
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.pad_token and tok.eos_token and tok.pad_token_id != tok.eos_token_id
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text)["input_ids"] == tok(text)["input_ids"]
    assert reloaded.padding_side == "left"


def test_chat_template_renders_chatml_and_marks_assistant():
    tok = build_toy_tokenizer()
    messages = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    out = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    kept = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(kept) == "2<|im_end|>"


def test_arithmetic_answers_verify():
    ds = make_arithmetic_dataset(64, seed=3)
    for row in ds:
        a, b = map(int, re.fullmatch(r"(\d+)\+(\d+)=", row["prompt"]).groups())
        assert row["answer"] == a + b == int(row["completion"])
    assert arithmetic_reward(ds["completion"], ds["answer"]) == [1.0] * 64
    wrong = [str(a + 1) for a in ds["answer"]]
    assert arithmetic_reward(wrong, ds["answer"]) == [0.0] * 64
    conv = make_arithmetic_dataset(8, conversational=True)
    assert conv[0]["prompt"][0]["role"] == "user"
    assert arithmetic_reward(conv["completion"], conv["answer"]) == [1.0] * 8


def test_heldout_is_disjoint():
    train = make_arithmetic_dataset(200)
    held = make_arithmetic_dataset(100, seed=1, exclude=train)
    assert not set(train["prompt"]) & set(held["prompt"])


def test_reasoning_traces_labels_verify():
    traces = make_reasoning_traces(40, seed=1)
    for row in traces:
        terms = list(map(int, re.findall(r"\d+", row["prompt"])))
        assert row["answer"] == sum(terms)
        final = int(re.search(r"Answer: (-?\d+)", row["completion"]).group(1))
        assert row["correct"] == (final == sum(terms))
    assert 0.2 < sum(traces["correct"]) / len(traces) < 0.8
    prefs = make_reasoning_preferences(40)
    assert reasoning_reward(prefs["chosen"], prefs["answer"]) == [1.0] * 40
    assert reasoning_reward(prefs["rejected"], prefs["answer"]) == [0.0] * 40
    assert check_reasoning_answer("no answer here", 3) == 0.0


def test_mixed_quality_sets_labels():
    ds = make_mixed_quality_sft(400, seed=2)
    counts = {q: ds["quality"].count(q) for q in ("clean", "noise", "easy", "hard")}
    assert all(c > 30 for c in counts.values()), counts
    for row in ds:
        ok = arithmetic_reward([row["completion"]], [row["answer"]])[0]
        assert ok == (0.0 if row["quality"] == "noise" else 1.0)
        if row["quality"] == "hard":
            a, b = map(int, row["prompt"][:-1].split("*"))
            assert row["answer"] == a * b


def test_uuid_pairs_and_char_accuracy():
    ds = make_uuid_dataset(16, seed=4)
    assert len(set(ds["prompt"])) == 16
    assert all(re.fullmatch(r"[0-9a-f-]{36}", v) for v in ds["completion"])
    assert uuid_char_accuracy(ds["completion"], ds["answer"]) == [1.0] * 16
    value = ds[0]["answer"]
    half = value[:18] + "".join("x" for _ in value[18:])
    assert uuid_char_accuracy([half], [value]) == [0.5]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(arch="mamba"), "Unknown toy architecture arch='mamba'"),
        (dict(hidden_size=30, num_attention_heads=4), "not divisible"),
        (dict(num_hidden_layers=0), "num_hidden_layers=0"),
        (dict(hidden_size=-8), "hidden_size=-8"),
        (dict(num_key_value_heads=3), "num_key_value_heads=3"),
    ],
)
def test_bad_model_specs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ToyModelSpec(**kwargs)


def test_bad_dataset_sizes_are_refused():
    with pytest.raises(ValueError, match="n=5000 exceeds"):
        make_arithmetic_dataset(5000, max_operand=10)
    with pytest.raises(ValueError, match="mix="):
        make_mixed_quality_sft(10, mix=(0.5, 0.5, 0.5, 0.5))


@torch.no_grad()
def _greedy_answers(model, tok, prompts, max_new_tokens=5):
    """Slow token-by-token greedy decoding, independent of ``generate``."""
    texts = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        for _ in range(max_new_tokens):
            nxt = model(ids).logits[0, -1].argmax()
            if nxt.item() == tok.eos_token_id:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        texts.append(tok.decode(ids[0, len(tok(prompt)["input_ids"]) :]))
    return texts


def test_pretraining_reaches_stated_heldout_accuracy():
    path = pretrained_toy_model_path(progress=False)
    metrics = pretrain_metrics(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    train, held = pretrain_datasets(PretrainConfig())
    assert len(held) == 200 and not set(train["prompt"]) & set(held["prompt"])
    # Independent of the recorded metrics and of ``generate``: slow token-by-token greedy decoding.
    texts = _greedy_answers(model, tok, held["prompt"])
    accuracy = sum(arithmetic_reward(texts, held["answer"])) / len(held)
    # The README promises at least 90% held-out; it reaches that at 1 and 2 threads with margin.
    assert accuracy >= 0.9, (accuracy, metrics)
    assert abs(accuracy - metrics["heldout_accuracy"]) <= 0.02
    # The same architecture untrained is at chance: the accuracy comes from training.
    random_model = AutoModelForCausalLM.from_pretrained(toy_model_path(ToyModelSpec())).eval()
    random_texts = _greedy_answers(random_model, tok, held["prompt"][:50])
    assert sum(arithmetic_reward(random_texts, held["answer"][:50])) <= 2
    assert metrics["heldout_accuracy_before"] <= 0.05


def test_build_once_never_caches_an_incomplete_build(tmp_path):
    from peft_trl_testbed.models import build_once

    target = tmp_path / "model"
    with pytest.raises(RuntimeError, match=r"wrote no config.json \(in .*\); nothing was cached"):
        build_once(target, "config.json", lambda tmp: (tmp.mkdir(), (tmp / "tokenizer.json").write_text("{}")))
    assert not target.exists() and list(tmp_path.iterdir()) == []
    built = build_once(target, "config.json", lambda tmp: (tmp.mkdir(), (tmp / "config.json").write_text("{}")))
    assert built == str(target) and (target / "config.json").exists()


def test_build_once_refuses_to_build_under_zero3_init(tmp_path, monkeypatch):
    import transformers.integrations

    from peft_trl_testbed.models import build_once

    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(RuntimeError, match="ZeRO-3 init is active"):
        build_once(tmp_path / "model", "config.json", lambda tmp: pytest.fail("built under ZeRO-3"))


@pytest.mark.parametrize("checkpointing", [None, True, False])
def test_toy_args_take_the_old_checkpointing_name_without_a_future_warning(tmp_path, checkpointing):
    import warnings

    from transformers import TrainingArguments

    from peft_trl_testbed import toy_args

    overrides = {} if checkpointing is None else {"gradient_checkpointing": checkpointing}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = toy_args(TrainingArguments, tmp_path, **overrides)
    assert args.activation_checkpointing is bool(checkpointing) and args.gradient_checkpointing is bool(checkpointing)
    with pytest.raises(ValueError, match="gradient_checkpointing=True and activation_checkpointing=False disagree"):
        toy_args(TrainingArguments, tmp_path, gradient_checkpointing=True, activation_checkpointing=False)
