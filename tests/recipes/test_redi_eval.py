"""The REDI evaluation command: greedy held-out accuracy, checked against decoding each prompt alone."""

import json
import re
import shlex

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_trl_testbed import make_arithmetic_dataset, pretrained_toy_model_path
from recipes import redi_eval


def _reference_accuracy(path: str, prompts: list[str], answers: list[int]) -> float:
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    hits = 0
    for prompt, answer in zip(prompts, answers):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=6,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        match = re.search(r"-?\d+", text)
        hits += match is not None and int(match.group()) == answer
    return hits / len(prompts)


def test_accuracy_on_a_dataset_matches_decoding_each_prompt_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)
    problems = make_arithmetic_dataset(24, seed=5)
    data = tmp_path / "problems"
    data.mkdir()
    with open(data / "test.jsonl", "w") as f:
        for p, a in zip(problems["prompt"], problems["answer"]):
            f.write(json.dumps({"prompt": p, "answer": a}) + "\n")
    path = pretrained_toy_model_path()
    argv = shlex.split(
        f"--model_name_or_path {path} --dataset_name {data} --num_eval_prompts 16 --max_new_tokens 6 "
        f"--batch_size 5 --verifier tests.recipes.rewards:first_int_equals_answer "
        f"--output_file {tmp_path / 'acc.json'}"
    )
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    results = redi_eval.main(*redi_eval.make_parser().parse_args_into_dataclasses(args=argv))
    expected = _reference_accuracy(path, problems["prompt"][:16], problems["answer"][:16])
    assert results[path] == expected > 0.5  # the pretrained toy model mostly adds correctly
    assert json.loads((tmp_path / "acc.json").read_text()) == results


def test_toy_default_is_the_recipes_held_out_set():
    from peft_trl_testbed import check_reasoning_answer, make_reasoning_traces

    path = pretrained_toy_model_path()
    results = redi_eval.main(
        *redi_eval.make_parser().parse_args_into_dataclasses(
            args=["--model_name_or_path", path, "--num_eval_prompts", "8", "--seed", "3"]
        )
    )
    # Reference: the reasoning task's held-out problems for seed 3 (offset 10,000 from the training seeds),
    # each decoded alone (48 new tokens) and checked with the toy checker.
    held_out = make_reasoning_traces(8, seed=10_000 + 3, traces_per_prompt=1)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    hits = 0
    for prompt, answer in zip(held_out["prompt"], held_out["answer"]):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=48,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        hits += check_reasoning_answer(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), answer)
    assert results[path] == hits / len(held_out)


def test_documented_commands_parse():
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    texts = [redi_eval.__doc__, open(os.path.join(root, "README.md")).read()]
    commands = [
        flags
        for text in texts
        for flags in re.findall(r"python -m recipes\.redi_eval([^`\n]*)", text.replace("\\\n", " "))
    ]
    assert len(commands) >= 3
    for flags in commands:
        (args,) = redi_eval.make_parser().parse_args_into_dataclasses(args=shlex.split(flags))
        assert args.model_name_or_path


def test_flags_the_toy_set_would_ignore_are_refused():
    import pytest

    for flags in ("--verifier math", "--max_new_tokens 9", "--dataset_split validation", "--batch_size 3"):
        argv = ["--model_name_or_path", "/no/such/model", *shlex.split(flags)]
        with pytest.raises(ValueError, match=rf"redi_eval: {flags.split()[0]} .* would be ignored: the toy held-out"):
            redi_eval.main(*redi_eval.make_parser().parse_args_into_dataclasses(args=argv))
