"""Held-out greedy accuracy of one or more models, side by side: the third step of the REDI pipeline.

On the toy default it decodes the reasoning task's held-out prompts (the set the REDI recipe
reports, for the same ``--seed``) and checks the ``Answer: N`` line. With ``--dataset_name`` it
decodes that dataset's ``prompt`` column and checks each completion against its ``answer``
column with ``--verifier`` (``math``, ``toy`` or ``module:function``); a verifier that raises
counts the answer as wrong.

    python -m recipes.redi_eval --model_name_or_path outputs/redi-teacher/sft outputs/redi-teacher
    python -m recipes.redi_eval --model_name_or_path outputs/redi --dataset_name my/problems \\
        --dataset_split test --verifier math --max_new_tokens 1024
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from recipes.common import ToyEval, refuse_ignored_flags
from recipes.redi_two_stage import get_verifier
from trl_ext.redi import verify_traces


@dataclass
class REDIEvalArguments:
    """What to evaluate, on which prompts, and how answers are checked."""

    model_name_or_path: list[str] = field(
        default_factory=list, metadata={"help": "Models to evaluate (paths or Hub ids), one after another."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Problems with `prompt` and `answer` columns; default: toy held-out set."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration of dataset_name."})
    dataset_split: str = field(default="test", metadata={"help": "Split of dataset_name to evaluate."})
    num_eval_prompts: int = field(default=200, metadata={"help": "Prompts to evaluate (the first N)."})
    verifier: str | None = field(
        default=None,
        metadata={"help": "'math', 'toy' or module:function; default 'toy' on the toy set, 'math' otherwise."},
    )
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "Longest completion; default 48 on the toy set, 1024 otherwise."}
    )
    seed: int = field(default=42, metadata={"help": "The training run's --seed: picks the toy held-out set."})
    batch_size: int = field(default=64, metadata={"help": "Prompts per generate call."})
    output_file: str | None = field(default=None, metadata={"help": "Also write the accuracies to this JSON file."})


def _problems(args: REDIEvalArguments) -> Dataset:
    data = load_dataset(args.dataset_name, name=args.dataset_config, split=args.dataset_split)
    missing = [c for c in ("prompt", "answer") if c not in data.column_names]
    if missing:
        raise ValueError(f"{args.dataset_name} has no {missing} column(s) (it has {data.column_names}); rename them.")
    return data.select(range(min(args.num_eval_prompts, len(data))))


def accuracy(model, tokenizer, problems: Dataset, verifier, max_new_tokens: int, batch_size: int = 64) -> float:
    """Fraction of greedy completions of ``problems["prompt"]`` that ``verifier`` accepts against ``answer``."""
    from peft_trl_testbed import generation_accuracy

    def render(prompt):
        is_chat = isinstance(prompt, list)
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False) if is_chat else prompt

    prompts = Dataset.from_dict({"prompt": [render(p) for p in problems["prompt"]], "answer": problems["answer"]})

    def score(texts, answers):
        return [float(ok is True) for ok in verify_traces(texts, answers, verifier)[0]]  # raised: counted wrong

    return generation_accuracy(model, tokenizer, prompts, score, max_new_tokens, batch_size=batch_size)


def main(args: REDIEvalArguments) -> dict[str, float]:
    if not args.model_name_or_path:
        raise ValueError("No model to evaluate; pass --model_name_or_path PATH [PATH ...].")
    if not args.dataset_name:  # the toy set has its own checker, split and length
        reason = "the toy held-out set is decoded with its own checker and length; it applies with --dataset_name"
        names = ("verifier", "dataset_config", "dataset_split", "max_new_tokens", "batch_size")
        refuse_ignored_flags("redi_eval", dict.fromkeys(names, reason), args)
    if args.dataset_name:
        problems = _problems(args)
        verifier = get_verifier(args)
    device = torch.accelerator.current_accelerator() or "cpu"
    results = {}
    for path in args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).to(device)
        if args.dataset_name:
            results[path] = accuracy(
                model, tokenizer, problems, verifier, args.max_new_tokens or 1024, args.batch_size
            )
        else:
            results[path] = ToyEval("reasoning", num_prompts=args.num_eval_prompts, seed=args.seed)(model, tokenizer)
        print(f"[redi_eval] {path}: held-out accuracy {results[path]:.1%}")
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump(results, f, indent=2)
    return results


def make_parser() -> HfArgumentParser:
    """The evaluation's parser (``REDIEvalArguments``)."""
    return HfArgumentParser(REDIEvalArguments)


if __name__ == "__main__":
    main(*make_parser().parse_args_into_dataclasses())
