"""REDI end to end: teacher traces -> labels -> pairs -> SFT on the correct traces -> REDI on the pairs.

Where the traces come from, in order of precedence:

- ``--traces_path``: traces saved by an earlier run (``<output_dir>/traces``), reused as they are;
- ``--teacher_model_name_or_path`` (a path, a Hub id, or ``toy`` for the embedded toy teacher):
  ``--num_traces_per_prompt`` traces are sampled per prompt (``--teacher_temperature``,
  ``--teacher_max_new_tokens``) and labelled with ``--verifier``. The prompts are the ``prompt``
  and ``answer`` columns of ``--dataset_name``, or ``--num_toy_prompts`` toy problems;
- ``--dataset_name`` alone: a trace dataset with ``prompt``/``completion``/``answer`` columns (and
  optionally a boolean ``correct`` column, else traces are labelled with ``--verifier``);
- nothing: the toy step-by-step traces, whose wrong traces are a correct one with a slipped step.

Every stage writes under ``--output_dir``: ``traces/`` and ``pairs/`` (``save_to_disk``), ``sft/``
(the stage-1 model) and the REDI model at the top level. Traces are never overwritten: an output
folder that already holds ``traces/`` is reused only with ``--traces_path <output_dir>/traces``
(then they stay as they are). ``--skip_sft`` starts REDI from ``--model_name_or_path``, also
when resuming. Both stages read one parsed :class:`~trl_ext.REDIConfig`; stage 1's
``SFTConfig`` is derived from it, with ``--sft_learning_rate``, ``--sft_max_steps`` and
``--sft_batch_size``. A teacher with no correct trace, prompts without an answer column, labels
that are not booleans, or flags that would be ignored (``--verifier`` on labelled traces, teacher
flags without a teacher, ``--sft_*`` with ``--skip_sft``, ...) stop the run with a clear error
before any work.

    python -m recipes.redi_two_stage --output_dir outputs/redi --max_steps 100
    python -m recipes.redi_two_stage --teacher_model_name_or_path toy --num_traces_per_prompt 4 \\
        --output_dir outputs/redi-teacher
    python -m recipes.redi_two_stage --traces_path outputs/redi-teacher/traces --skip_sft \\
        --model_name_or_path outputs/redi-teacher/sft --output_dir outputs/redi-stage2 --max_steps 50
    python -m recipes.redi_two_stage --config recipes/configs/redi.yaml
    python -m recipes.redi_two_stage --model_name_or_path Qwen/Qwen2.5-Math-1.5B \\
        --dataset_name my/traces --sft_learning_rate 5e-5 --learning_rate 1e-6 --dtype bfloat16
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from datasets import Dataset, load_dataset, load_from_disk
from transformers import AutoConfig, AutoTokenizer, TrainingArguments
from trl import ModelConfig, SFTConfig, SFTTrainer

from peft_trl_testbed import check_reasoning_answer, make_reasoning_traces, toy_teacher_path
from recipes.common import (
    RunRecord,
    ToyScriptArguments,
    adapter_record,
    check_run,
    finish,
    import_callable,
    load_model,
    lora_config,
    make_recipe_parser,
    model_init_kwargs,
    model_path,
    refuse_deepspeed_stages,
    toy_eval,
    train,
)
from trl_ext._args import convert_args
from trl_ext.redi import (
    REDIConfig,
    REDITrainer,
    TraceReport,
    Verifier,
    check_generation_args,
    check_labels,
    generate_traces,
    label_traces,
    math_verify_checker,
    positives,
    traces_to_pairs,
)


@dataclass
class REDIScriptArguments(ToyScriptArguments):
    """Script arguments plus the traces and stage 1 (SFT); stage 2's are those of :class:`~trl_ext.REDIConfig`."""

    num_toy_prompts: int = field(
        default=512, metadata={"help": "Toy prompts: in the default trace set, or answered by the teacher."}
    )
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Teacher to sample traces from (path, Hub id, or 'toy' for the embedded toy teacher). "
            "Default: no teacher; traces come from --traces_path, --dataset_name or the toy trace set."
        },
    )
    num_traces_per_prompt: int = field(default=4, metadata={"help": "Traces sampled from the teacher per prompt."})
    teacher_temperature: float = field(default=0.8, metadata={"help": "Teacher sampling temperature."})
    teacher_top_p: float = field(default=1.0, metadata={"help": "Teacher nucleus-sampling top_p."})
    teacher_max_new_tokens: int = field(default=256, metadata={"help": "Longest teacher trace, in tokens."})
    teacher_batch_size: int = field(default=64, metadata={"help": "Prompts per teacher generate call."})
    traces_path: str | None = field(
        default=None,
        metadata={"help": "Labelled traces saved by an earlier run (`<output_dir>/traces`); skips generation."},
    )
    verifier: str | None = field(
        default=None,
        metadata={
            "help": "Trace verifier: 'math' (math-verify, boxed answers), 'toy' (the toy task's `Answer: N` "
            "checker) or module:function taking (completion, answer) -> bool. Default: 'toy' on the toy prompts, "
            "'math' with --dataset_name."
        },
    )
    max_trace_length: int | None = field(default=None, metadata={"help": "Drop traces longer than this (tokens)."})
    sft_learning_rate: float = field(default=3e-3, metadata={"help": "Stage-1 (SFT) learning rate."})
    sft_max_steps: int = field(default=800, metadata={"help": "Stage-1 (SFT) optimisation steps."})
    sft_batch_size: int = field(default=32, metadata={"help": "Stage-1 (SFT) per-device batch size."})
    skip_sft: bool = field(default=False, metadata={"help": "Start REDI directly from model_name_or_path."})


VERIFIERS = {"math": math_verify_checker, "toy": check_reasoning_answer}


def get_verifier(script_args) -> Verifier:
    """The ``--verifier`` callable (``math``, ``toy`` or ``module:function``); by default the toy checker on
    toy prompts and math-verify with ``--dataset_name``."""
    name = script_args.verifier or ("math" if script_args.dataset_name else "toy")
    if name in VERIFIERS:
        return VERIFIERS[name]
    if ":" in name:
        return import_callable(name)
    raise ValueError(f"verifier={name!r} is unknown; use one of {sorted(VERIFIERS)} or module:function.")


def _dataset(script_args: REDIScriptArguments) -> Dataset:
    return load_dataset(
        script_args.dataset_name, name=script_args.dataset_config, split=script_args.dataset_train_split
    )


def teacher_prompts(script_args: REDIScriptArguments, seed: int = 0) -> Dataset:
    """The prompts the teacher answers: ``--dataset_name``'s, or ``--num_toy_prompts`` toy problems."""
    if script_args.dataset_name:
        return _dataset(script_args)
    toy = make_reasoning_traces(script_args.num_toy_prompts, seed=seed, traces_per_prompt=1)
    return toy.select_columns(["prompt", "answer"])


def sample_traces(script_args: REDIScriptArguments, seed: int = 0) -> tuple[Dataset, TraceReport]:
    """Traces sampled from ``--teacher_model_name_or_path`` and labelled with the verifier."""
    teacher = script_args.teacher_model_name_or_path
    if teacher == "toy":
        teacher = toy_teacher_path()
    return generate_traces(
        teacher,
        teacher_prompts(script_args, seed),
        get_verifier(script_args),
        script_args.num_traces_per_prompt,
        temperature=script_args.teacher_temperature,
        top_p=script_args.teacher_top_p,
        max_new_tokens=script_args.teacher_max_new_tokens,
        batch_size=script_args.teacher_batch_size,
        seed=seed,
    )


def load_traces(script_args: REDIScriptArguments, seed: int = 0) -> tuple[Dataset, TraceReport | None]:
    """Labelled traces (with a boolean ``correct`` column) and, when a teacher sampled them, its report.

    ``--traces_path``, else the teacher, else ``--dataset_name``, else the toy traces.
    """
    if script_args.traces_path:
        traces = _saved_traces(script_args.traces_path)
    elif script_args.teacher_model_name_or_path:
        return sample_traces(script_args, seed)
    elif script_args.dataset_name:
        traces = _dataset(script_args)
    else:
        return make_reasoning_traces(script_args.num_toy_prompts, seed=seed), None
    if "correct" not in traces.column_names:
        return label_traces(traces, verifier=get_verifier(script_args)), None
    if script_args.verifier:
        source = script_args.traces_path or script_args.dataset_name
        raise ValueError(
            f"--verifier {script_args.verifier!r} would be ignored: the traces in {source!r} are already labelled "
            "(they have a 'correct' column). Remove --verifier, or drop the column to relabel them."
        )
    return check_labels(traces), None


def _saved_traces(path: str) -> Dataset:
    """The traces an earlier run saved at ``path``, or a ``ValueError`` naming the path and the problem."""
    if not os.path.isdir(path):
        raise ValueError(
            f"--traces_path {path!r} is not a folder; pass the traces/ folder an earlier run saved (save_to_disk)."
        )
    try:
        return load_from_disk(path)
    except FileNotFoundError as err:
        raise ValueError(
            f"--traces_path {path!r} holds no dataset saved with save_to_disk ({err}); pass an earlier run's traces/."
        ) from err


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def ignored_flags(script_args: REDIScriptArguments) -> dict[str, str]:
    """This recipe's flags that the other flags make ineffective, with the reason."""
    ignored = {}
    teacher = (
        "num_traces_per_prompt",
        "teacher_temperature",
        "teacher_top_p",
        "teacher_max_new_tokens",
        "teacher_batch_size",
    )
    if script_args.traces_path:
        reason = "--traces_path is given, so its traces are used and no other source is read"
        ignored |= {name: reason for name in ("teacher_model_name_or_path", "dataset_name", "num_toy_prompts")}
    if not script_args.teacher_model_name_or_path:
        ignored |= {name: "it applies only with --teacher_model_name_or_path" for name in teacher}
    if script_args.dataset_name:
        ignored["num_toy_prompts"] = "--dataset_name gives the prompts or traces"
    if not (script_args.traces_path or script_args.teacher_model_name_or_path or script_args.dataset_name):
        ignored["verifier"] = "the default toy traces are already labelled"
    if script_args.skip_sft:
        ignored |= {
            name: "--skip_sft skips stage 1" for name in ("sft_learning_rate", "sft_max_steps", "sft_batch_size")
        }
    return ignored


def sft_config(args: REDIConfig, script_args: REDIScriptArguments) -> SFTConfig:
    """Stage 1's ``SFTConfig``: the parsed ``REDIConfig``'s ``TrainingArguments`` values (use_cpu, bf16, seed,
    ...) with the ``--sft_*`` flags, a cosine schedule and ``output_dir=<output_dir>/sft``; SFT's own fields
    keep SFT's defaults."""
    steps = script_args.sft_max_steps
    return convert_args(
        args,
        SFTConfig,
        "the SFT stage",
        carry=TrainingArguments,
        output_dir=os.path.join(args.output_dir, "sft"),
        learning_rate=script_args.sft_learning_rate,
        max_steps=steps,
        per_device_train_batch_size=script_args.sft_batch_size,
        lr_scheduler_type="cosine",
        warmup_steps=min(20, steps // 10),
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        resume_from_checkpoint=None,
        push_to_hub=False,
    )


def sft_stage(
    model_path: str,
    train_dataset: Dataset,
    args: REDIConfig,
    script_args: REDIScriptArguments,
    model_args: ModelConfig | None = None,
) -> str:
    """Stage 1: SFT on positive traces. Saves the model and tokenizer; returns their path.

    Later stages load from this path: a trained model object carries TRL's patched forward,
    which ``copy.deepcopy`` does not re-bind, so copies would silently share weights.
    """
    sft_args = sft_config(args, script_args)
    model, tokenizer = load_model(model_args or ModelConfig(), sft_args, path=model_path)
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=train_dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(sft_args.output_dir)
    tokenizer.save_pretrained(sft_args.output_dir)
    return sft_args.output_dir


def redi_stage(
    model_path: str,
    pairs: Dataset,
    args: REDIConfig,
    model_args: ModelConfig | None = None,
    callbacks=None,
    checkpoint: str | None = None,
) -> REDITrainer:
    """Stage 2: REDI on preference pairs, starting from ``model_path`` (resuming ``checkpoint`` if given).
    Returns the trained trainer."""
    model_args = model_args or ModelConfig()
    args.model_init_kwargs = model_init_kwargs(model_args, args) | (args.model_init_kwargs or {})
    trainer = REDITrainer(
        model=model_path,
        args=args,
        train_dataset=pairs,
        callbacks=callbacks,
        peft_config=lora_config(model_args, AutoConfig.from_pretrained(model_path)),
    )
    train(trainer, checkpoint)
    return trainer


def main(script_args: REDIScriptArguments, training_args: REDIConfig, model_args: ModelConfig, callbacks=None) -> dict:
    check_run("redi_two_stage", script_args, training_args, model_args, lora=True, ignored=ignored_flags(script_args))
    out = training_args.output_dir
    path = model_path(model_args)
    # Checks before any work: the traces are never overwritten, the sampling flags work, the resume is ours.
    traces_dir = os.path.join(out, "traces")
    in_place = bool(script_args.traces_path) and _same_path(script_args.traces_path, traces_dir)
    if script_args.traces_path and _same_path(script_args.traces_path, os.path.join(out, "pairs")):
        raise ValueError(
            f"--traces_path {script_args.traces_path!r} is this run's pairs/ folder, which the run rewrites; pass "
            f"the traces/ folder ({traces_dir})."
        )
    if os.path.exists(traces_dir) and not in_place:
        raise ValueError(
            f"{traces_dir!r} already holds traces from an earlier run, and this run would overwrite them. Reuse them "
            f"with --traces_path {traces_dir} (add --resume_from_checkpoint true to continue that run's training), or "
            "pick another --output_dir."
        )
    if script_args.teacher_model_name_or_path:
        check_generation_args(
            temperature=script_args.teacher_temperature,
            top_p=script_args.teacher_top_p,
            max_new_tokens=script_args.teacher_max_new_tokens,
            batch_size=script_args.teacher_batch_size,
            seed=training_args.seed,
        )
    record = RunRecord(
        "redi_two_stage", "REDI stage 2", adapter_record(lora_config(model_args, AutoConfig.from_pretrained(path)))
    )
    checkpoint = record.check_resume(training_args)
    sft_path = os.path.join(out, "sft")
    stage_1_saved = bool(checkpoint) and os.path.exists(os.path.join(sft_path, "config.json"))
    if not (script_args.skip_sft or stage_1_saved):  # checked before the traces are sampled
        refuse_deepspeed_stages(
            training_args,
            "recipes.redi_two_stage (stage 1 SFT, then stage 2 REDI)",
            "Run stage 2 alone with --skip_sft --model_name_or_path <the stage-1 SFT model>, or launch the two "
            "stages with recipes/accelerate_configs/multi_gpu.yaml.",
        )
    seconds = {}
    start = time.perf_counter()
    traces, trace_report = load_traces(script_args, seed=training_args.seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # Stops here, before any training, when no trace is correct.
    pairs, report = traces_to_pairs(traces, trace_report, max_length=script_args.max_trace_length, tokenizer=tokenizer)
    if len(pairs) == 0:
        raise ValueError(
            f"No REDI pair could be built: {report.pairs}. A pair needs a prompt with both a correct and an "
            "incorrect trace; sample more traces per prompt (--num_traces_per_prompt), raise --teacher_temperature, "
            "or use more prompts."
        )
    if in_place:  # a dataset cannot overwrite itself; the saved traces stay exactly as they were
        print(f"[redi] reusing the traces in {traces_dir}")
    else:
        traces.save_to_disk(traces_dir)
    pairs.save_to_disk(os.path.join(out, "pairs"))
    seconds["traces and pairs"] = time.perf_counter() - start
    print(f"[redi] {report}")
    start = time.perf_counter()
    if script_args.skip_sft:
        print(f"[redi] --skip_sft: stage 2 starts from {path}")
    elif stage_1_saved:
        print(f"[redi] resuming stage 2: stage 1's model is already saved in {sft_path}")
        path = sft_path
    else:
        sft_data = positives(traces).select_columns(["prompt", "completion"])
        path = sft_stage(path, sft_data, training_args, script_args, model_args)
        seconds["SFT"] = time.perf_counter() - start
    results = {"pairs": report.pairs.pairs, "dropped": dict(report.pairs.dropped), "data": report.to_dict()}
    evaluate = toy_eval(script_args, "reasoning", seed=training_args.seed)
    if evaluate:
        model, _ = load_model(model_args, training_args, path=path)
        results["accuracy_after_sft"] = evaluate(model, tokenizer)
    start = time.perf_counter()
    trainer = redi_stage(path, pairs, training_args, model_args, [*(callbacks or []), record.callback()], checkpoint)
    seconds["REDI"] = time.perf_counter() - start
    results["dtype"] = str(trainer.model.dtype)
    if evaluate:
        results["accuracy_after_redi"] = evaluate(trainer.model, tokenizer)
    finish(trainer, script_args, results, record)
    results["model_path"] = out
    results["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    print("[redi] stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in results["seconds"].items()))
    print(f"[redi] { {k: v for k, v in results.items() if k not in ('log_history', 'data')} }")
    return results


def make_parser():
    """The recipe's ``TrlParser``: ``REDIScriptArguments``, ``REDIConfig`` and ``ModelConfig``, with ``--config``."""
    return make_recipe_parser(REDIScriptArguments, REDIConfig)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
