"""Each recipe runs from its command line on Qwen2 and GPT-2 toy models without a dataset, honours
``--dtype``, resumes from a checkpoint, and every documented command parses."""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from trl import SFTConfig

from peft_trl_testbed import toy_model_path
from recipes import mora_sft, prefix_grouper_grpo, qtuning_sft, redi_two_stage, subnet_grpo

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RECIPES = {
    "mora_sft": mora_sft,
    "qtuning_sft": qtuning_sft,
    "prefix_grouper_grpo": prefix_grouper_grpo,
    "subnet_grpo": subnet_grpo,
    "redi_two_stage": redi_two_stage,
}
COMMON = "--max_steps 2 --num_eval_prompts 8 --report_to none --disable_tqdm true --logging_steps 1"
GRPO = "--per_device_train_batch_size 4 --num_generations 4 --max_completion_length 4"
# Two smoke steps per recipe: tiny batches, 8 held-out prompts, 4-token completions.
FLAGS = {
    "mora_sft": "--per_device_train_batch_size 4 --mora_r 4",
    "qtuning_sft": "--per_device_train_batch_size 8",
    "prefix_grouper_grpo": GRPO,
    # A random model's exact-answer reward is always 0; a reward that varies gives GRPO updates to select.
    "subnet_grpo": f"{GRPO} --learning_rate 1e-4 --max_grad_norm 0 --reward_funcs tests.recipes.rewards:distinct_characters",
    "redi_two_stage": "--per_device_train_batch_size 2 --sft_max_steps 2 --sft_batch_size 4 --num_toy_prompts 16",
}


def _argv(name: str, output_dir, *extra: str) -> list[str]:
    return ["--output_dir", str(output_dir), *shlex.split(f"{COMMON} {FLAGS[name]}"), *extra]


def _main(name: str, argv: list[str]) -> dict:
    recipe = RECIPES[name]
    return recipe.main(*recipe.make_parser().parse_args_and_config(args=argv))


def _check_outputs(name: str, output_dir, results: dict) -> None:
    assert results["log_history"], name
    if name == "mora_sft":
        assert results["update_rank"] > results["lora_rank_same_params"]  # the high-rank update MoRA exists for
        assert (output_dir / "adapter_model.safetensors").exists()
    elif name == "qtuning_sft":
        assert (output_dir / "eu_plane.png").stat().st_size > 1000
        assert any("qtuning/kept_samples" in h for h in results["log_history"])
    elif name == "prefix_grouper_grpo":
        assert (output_dir / "model.safetensors").exists()
    elif name == "subnet_grpo":
        assert 0 < results["density"] < 1 and results["trainable"] > 0
        assert (output_dir / "subnet_sparsity.png").exists()
        assert (output_dir / "subnet" / "adapter_model.safetensors").exists()
    elif name == "redi_two_stage":
        assert (output_dir / "sft" / "config.json").exists() and (output_dir / "model.safetensors").exists()


# One real subprocess runs every recipe as ``python -m recipes.<name> <flags>`` would (runpy with
# ``run_name="__main__"``, as ``-m`` does), so the libraries are imported once rather than five times.
RUN_AS_MAIN = """
import runpy, sys, traceback
for name, argv in RUNS:
    print(f"=== {name} start", flush=True)
    sys.argv = [name, *argv]
    try:
        runpy.run_module(f"recipes.{name}", run_name="__main__", alter_sys=True)
        status = 0
    except BaseException:
        traceback.print_exc(file=sys.stdout)
        status = 1
    print(f"=== {name} exit {status}", flush=True)
"""


@pytest.fixture(scope="module")
def qwen2_cli_runs(tmp_path_factory):
    """Every recipe from its command line on a Qwen2 toy model with ``--dtype bfloat16``: name -> (dir, stdout)."""
    model = toy_model_path(arch="qwen2")
    dirs = {name: tmp_path_factory.mktemp(name) for name in RECIPES}
    runs = [
        (name, ["--model_name_or_path", model, "--dtype", "bfloat16", *_argv(name, out)]) for name, out in dirs.items()
    ]
    proc = subprocess.run(
        [sys.executable, "-c", f"RUNS = {runs!r}\n{RUN_AS_MAIN}"], cwd=ROOT, text=True, capture_output=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = re.findall(r"=== (\w+) start\n(.*?)=== \1 exit (\d)", proc.stdout, re.S)
    return {name: (dirs[name], stdout, int(status)) for name, stdout, status in runs}


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_cli_on_qwen2_in_bfloat16(name, qwen2_cli_runs):
    out, stdout, status = qwen2_cli_runs[name]
    assert status == 0, stdout[-3000:]
    assert any(out.iterdir())  # saved what it trained
    assert "'dtype': 'torch.bfloat16'" in stdout  # --dtype reached the trained model
    assert stdout.count("no accelerator found") == (0 if torch.accelerator.is_available() else 1)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_on_gpt2(name, tmp_path):
    # GPT-2's Conv1D projections (c_attn, c_proj, c_fc): the adapters' per-architecture targets.
    results = _main(name, _argv(name, tmp_path, "--model_name_or_path", toy_model_path(arch="gpt2")))
    assert results["dtype"] == ("torch.bfloat16" if name == "subnet_grpo" else "torch.float32")  # recipe defaults
    assert "accuracy_before" in results or "accuracy_after_sft" in results or name == "subnet_grpo"
    _check_outputs(name, tmp_path, results)


RESUME = tuple("--max_steps 4 --save_strategy steps --save_steps 2 --learning_rate 1e-3 --num_eval_prompts 0".split())
SAVED = {"mora_sft": "adapter_model.safetensors", "redi_two_stage": "model.safetensors"}


def _resumed(name: str, tmp_path, tag: str, checkpoint, resume: str, tamper: bool = False) -> dict:
    out = tmp_path / tag
    shutil.copytree(checkpoint, out / checkpoint.name)
    if name == "redi_two_stage":  # stage 1 is done: the resumed run reuses its saved model
        shutil.copytree(checkpoint.parent / "sft", out / "sft")
    if tamper:
        path = out / checkpoint.name / SAVED[name]
        weights = load_file(path)
        key = next(k for k in weights if weights[k].is_floating_point() and weights[k].dim() == 2)
        weights[key] = weights[key] + 0.05
        save_file(weights, path)
    resume = str(out / checkpoint.name) if resume == "path" else resume
    _main(name, _argv(name, out, *RESUME, "--resume_from_checkpoint", resume))
    return load_file(out / SAVED[name])


@pytest.fixture(scope="module")
def checkpointed_runs(tmp_path_factory):
    """One run per recipe in SAVED with a checkpoint every 2 of 4 steps: name -> its output_dir."""
    runs = {}

    def run(name):
        if name not in runs:
            out = tmp_path_factory.mktemp(f"{name}_full")
            _main(name, _argv(name, out, *RESUME))
            runs[name] = out
        return runs[name]

    return run


@pytest.mark.parametrize("name", SAVED)
def test_resume_continues_from_the_checkpoint(name, tmp_path, checkpointed_runs):
    full_dir = checkpointed_runs(name)
    full = load_file(full_dir / SAVED[name])
    checkpoint = full_dir / "checkpoint-2"
    resumed = _resumed(name, tmp_path, "resumed", checkpoint, "true")  # latest checkpoint in output_dir
    tampered = _resumed(name, tmp_path, "tampered", checkpoint, "path", tamper=True)
    diff = max((full[k] - resumed[k]).abs().max().item() for k in full)
    tampered_diff = max((full[k] - tampered[k]).abs().max().item() for k in full)
    print(f"{name}: max |w_full - w_resumed| = {diff:.3g}; max |w_full - w_tampered| = {tampered_diff:.3g}")
    assert diff <= 1e-6
    assert tampered_diff > 1e-2  # the resumed run used the checkpoint's weights


def _documented_commands():
    """``python -m recipes.<name> ...`` from each recipe's docstring and from the README."""
    texts = [module.__doc__ for module in RECIPES.values()]
    texts.append(open(os.path.join(ROOT, "README.md")).read())
    commands = []
    for text in texts:
        text = text.replace("\\\n", " ")
        for name, flags in re.findall(r"python -m recipes\.(\w+)([^`\n]*)", text):
            if name in RECIPES:
                commands.append((name, flags.strip()))
    return commands


DOCUMENTED = _documented_commands()


@pytest.mark.parametrize("name,flags", DOCUMENTED, ids=[f"{name}-{i}" for i, (name, _) in enumerate(DOCUMENTED)])
def test_documented_commands_parse(name, flags, monkeypatch):
    monkeypatch.chdir(ROOT)  # --config paths are relative to the repository root
    script_args, training_args, model_args = RECIPES[name].make_parser().parse_args_and_config(args=shlex.split(flags))
    assert training_args.output_dir
    # ... and sets no flag the recipe would refuse as ignored.
    from recipes.common import ignored_flags, refuse_ignored_flags

    lora = name in ("qtuning_sft", "prefix_grouper_grpo", "redi_two_stage")
    ignored = ignored_flags(script_args, model_args, lora, quantized=name == "mora_sft")
    if name == "redi_two_stage":
        ignored |= redi_two_stage.ignored_flags(script_args)
    refuse_ignored_flags(name, ignored, script_args, training_args, model_args)


def test_redi_stage_one_config_derives_from_the_parsed_redi_config(tmp_path):
    argv = ["--output_dir", str(tmp_path), *"--use_cpu true --seed 7 --gradient_accumulation_steps 3".split()]
    argv += "--sft_learning_rate 1e-3 --sft_max_steps 30 --sft_batch_size 5".split()
    script_args, training_args, _ = redi_two_stage.make_parser().parse_args_and_config(args=argv)
    sft = redi_two_stage.sft_config(training_args, script_args)
    assert (sft.use_cpu, sft.seed, sft.gradient_accumulation_steps, sft.bf16) == (True, 7, 3, training_args.bf16)
    assert (sft.learning_rate, sft.max_steps, sft.per_device_train_batch_size) == (1e-3, 30, 5)
    assert sft.output_dir == str(tmp_path / "sft")
    assert sft.loss_type == SFTConfig(output_dir="x", bf16=False).loss_type  # SFT's own fields keep SFT's defaults


# REDI from a teacher: generate -> label -> pair -> SFT -> REDI, each stage saved under output_dir.
TEACHER = (
    "--num_traces_per_prompt 3 --num_toy_prompts 6 --teacher_max_new_tokens 16 --teacher_batch_size 4 "
    "--sft_max_steps 2 --sft_batch_size 4 --max_steps 2 --per_device_train_batch_size 2 --num_eval_prompts 0 "
    "--report_to none --disable_tqdm true --save_strategy no"
)
STAGE2 = (
    "--max_steps 2 --per_device_train_batch_size 2 --num_eval_prompts 0 --report_to none --disable_tqdm true "
    "--save_strategy no"
)
VERIFIER = "tests.recipes.rewards:even_length"


def _redi(tmp_path, *extra: str, flags: str = TEACHER) -> dict:
    from peft_trl_testbed import pretrained_toy_model_path

    argv = [
        "--output_dir",
        str(tmp_path),
        "--teacher_model_name_or_path",
        pretrained_toy_model_path(),
        *shlex.split(flags),
        *extra,
    ]
    return _main("redi_two_stage", argv)


def test_redi_recipe_from_a_teacher_saves_every_stage(tmp_path, monkeypatch):
    from datasets import load_from_disk

    from peft_trl_testbed import make_reasoning_traces
    from tests.recipes.rewards import even_length

    monkeypatch.chdir(ROOT)
    results = _redi(tmp_path / "run", "--verifier", VERIFIER)
    traces = load_from_disk(tmp_path / "run" / "traces")
    assert set(traces.column_names) == {"prompt", "completion", "answer", "correct", "verifier_error"}
    assert len(traces) == 6 * 3
    # The prompts are the toy problems the flags name, each answered 3 times, labelled by the verifier.
    toy = make_reasoning_traces(6, seed=42, traces_per_prompt=1)
    assert sorted(set(traces["prompt"])) == sorted(toy["prompt"])
    assert traces["correct"] == [even_length(c, a) for c, a in zip(traces["completion"], traces["answer"])]
    # Reference pairing: one pair per prompt that has both a correct and an incorrect trace.
    labels = {}
    for p, ok in zip(traces["prompt"], traces["correct"]):
        labels.setdefault(p, set()).add(ok)
    pairs = load_from_disk(tmp_path / "run" / "pairs")
    assert len(pairs) == results["pairs"] == sum(v == {True, False} for v in labels.values()) > 0
    assert results["data"]["traces"]["traces"] == 18 and results["data"]["positives"] == sum(traces["correct"])
    assert (tmp_path / "run" / "sft" / "config.json").exists() and (tmp_path / "run" / "model.safetensors").exists()
    assert set(results["seconds"]) == {"traces and pairs", "SFT", "REDI"}

    # Rerun stage 2 alone from the saved traces and SFT model: no generation, the same pairs.
    import recipes.redi_two_stage as recipe

    monkeypatch.setattr(recipe, "generate_traces", lambda *a, **k: pytest.fail("traces were generated again"))
    again = _main(
        "redi_two_stage",
        [
            "--output_dir",
            str(tmp_path / "again"),
            *shlex.split(STAGE2),
            "--traces_path",
            str(tmp_path / "run" / "traces"),
            "--skip_sft",
            "--model_name_or_path",
            str(tmp_path / "run" / "sft"),
        ],
    )
    assert again["pairs"] == results["pairs"] and not (tmp_path / "again" / "sft").exists()


def test_redi_recipe_stops_before_training_without_a_correct_trace(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match="no correct traces out of 18"):
        _redi(tmp_path, "--verifier", "tests.recipes.rewards:never_correct")
    assert not (tmp_path / "sft").exists() and not (tmp_path / "model.safetensors").exists()


def test_redi_recipe_needs_an_answer_column_for_the_teacher(tmp_path, monkeypatch):
    import recipes.redi_two_stage as recipe

    data = tmp_path / "prompts"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "1+2+3="}\n{"prompt": "4+5+6="}\n')
    monkeypatch.setattr(recipe, "AutoModelForCausalLM", None, raising=False)
    with pytest.raises(ValueError, match="no answer column 'answer'"):
        _redi(tmp_path / "out", "--dataset_name", str(data), flags=TEACHER.replace("--num_toy_prompts 6 ", ""))
    assert not (tmp_path / "out" / "sft").exists()


def test_redi_recipe_stops_before_training_without_a_pair(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match="No REDI pair could be built"):
        _redi(tmp_path, "--verifier", "tests.recipes.rewards:always_correct")
    assert not (tmp_path / "sft").exists()


@pytest.mark.parametrize("name", ["subnet_grpo", "redi_two_stage"])
def test_multi_stage_recipes_refuse_deepspeed_before_training(name, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    zero3 = tmp_path / "zero3.json"
    zero3.write_text('{"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}')
    try:
        with pytest.raises(ValueError, match=r"under DeepSpeed \(one DeepSpeed engine set-up per process\)"):
            _main(name, _argv(name, tmp_path / "out", "--deepspeed", str(zero3)))
    finally:  # the parsed arguments switched ZeRO-3 init on for every later from_pretrained in this process
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    assert not (tmp_path / "out" / "sft").exists() and not (tmp_path / "out" / "full").exists()


# Which run wrote a checkpoint: recorded in each one, checked before a resume trains anything.
def test_a_checkpoint_records_its_recipe_and_adapter_and_a_foreign_resume_stops_before_training(
    tmp_path, checkpointed_runs, monkeypatch
):
    from peft_ext import MoraConfig
    from recipes.common import RECORD_FILE, RunRecord, adapter_record

    checkpoint = checkpointed_runs("mora_sft") / "checkpoint-2"
    record = RunRecord.load(checkpoint)
    expected = MoraConfig(
        r=4,
        mora_type="rotation",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    assert (record.recipe, record.method, record.adapter) == ("mora_sft", "MoRA SFT", adapter_record(expected))
    assert RunRecord.load(checkpointed_runs("mora_sft")).recipe == "mora_sft"  # the final output too
    assert RunRecord.load(checkpointed_runs("redi_two_stage") / "checkpoint-2").method == "REDI stage 2"

    # Every refusal happens before a trainer is built.
    for module in RECIPES.values():
        monkeypatch.setattr(module, "train", lambda *a, **k: pytest.fail("training started"), raising=False)
    resume = ("--resume_from_checkpoint", str(checkpoint), "--num_eval_prompts", "0")
    with pytest.raises(
        ValueError,
        match=r"written by recipe mora_sft \(MoRA SFT, MORA adapter\), but this run is "
        r"recipe qtuning_sft \(Q-Tuning SFT, full fine-tuning\)",
    ):
        _main("qtuning_sft", _argv("qtuning_sft", tmp_path / "q", *resume))
    with pytest.raises(ValueError, match=r"recipe mora_sft .* but this run is recipe prefix_grouper_grpo"):
        _main("prefix_grouper_grpo", _argv("prefix_grouper_grpo", tmp_path / "pg", *resume))
    with pytest.raises(
        ValueError,
        match=r"MORA adapter config differs from this run's \(r: 4 in the checkpoint, 8 "
        r"now\)",
    ):
        _main("mora_sft", _argv("mora_sft", tmp_path / "m", *resume, "--mora_r", "8"))
    with pytest.raises(ValueError, match=r"mora_type: 'rotation' in the checkpoint, 'sharing' now"):
        _main("mora_sft", _argv("mora_sft", tmp_path / "m", *resume, "--mora_type", "sharing"))
    # A checkpoint without a record was not written by a recipe of this package.
    bare = tmp_path / "bare" / "checkpoint-2"
    shutil.copytree(checkpoint, bare)
    (bare / RECORD_FILE).unlink()
    with pytest.raises(ValueError, match=rf"'{bare}': it has no {RECORD_FILE}"):
        _main("mora_sft", _argv("mora_sft", tmp_path / "m", "--resume_from_checkpoint", str(bare)))
    # subnet_grpo refuses a checkpoint outside its stage folders instead of training from scratch.
    with pytest.raises(
        ValueError, match=r"is not a checkpoint of this run's stages: subnet_grpo resumes from .*/full/"
    ):
        _main("subnet_grpo", _argv("subnet_grpo", tmp_path / "s", *resume))
    with pytest.raises(ValueError, match="neither stage folder"):
        _main("subnet_grpo", _argv("subnet_grpo", tmp_path / "s", "--resume_from_checkpoint", "true"))
    with pytest.raises(ValueError, match=r"holds no checkpoint-\* folder"):
        _main("mora_sft", _argv("mora_sft", tmp_path / "empty", "--resume_from_checkpoint", "true"))


IGNORED = [
    ("mora_sft", "--use_peft true --lora_r 16", "--use_peft True would be ignored: this recipe does not train LoRA"),
    ("mora_sft", "--lora_r 16", "--lora_r 16 would be ignored: this recipe does not train LoRA"),
    ("subnet_grpo", "--use_peft true", "--use_peft True would be ignored"),
    (
        "qtuning_sft",
        "--lora_r 8",
        "--lora_r 8 would be ignored: it configures LoRA, which is trained only with --use_peft",
    ),
    (
        "prefix_grouper_grpo",
        "--load_in_4bit true",
        "--load_in_4bit True would be ignored: only mora_sft trains on a quantised base",
    ),
    ("mora_sft", "--bnb_4bit_quant_type fp4", "--bnb_4bit_quant_type 'fp4' would be ignored: it configures 4-bit"),
    ("qtuning_sft", "--dataset_test_split validation", "--dataset_test_split 'validation' would be ignored"),
    ("mora_sft", "--dataset_config main", "--dataset_config 'main' would be ignored: it has no effect without"),
    ("redi_two_stage", "--verifier toy", "--verifier 'toy' would be ignored: the default toy traces are already"),
    ("redi_two_stage", "--skip_sft --sft_max_steps 5", "--sft_max_steps 5 would be ignored: --skip_sft skips stage 1"),
    (
        "redi_two_stage",
        "--teacher_temperature 0.5",
        "--teacher_temperature 0.5 would be ignored: it applies only with",
    ),
    (
        "redi_two_stage",
        "--teacher_model_name_or_path toy --teacher_max_new_tokens 0",
        "max_new_tokens=0 must be a positive integer",
    ),
    (
        "qtuning_sft",
        "--dataset_name some/data --num_eval_prompts 50",
        "--num_eval_prompts 50 would be ignored: the held-out evaluation runs on the toy data only",
    ),
    ("mora_sft", "--remora_every_n_steps 10", "mora_type='rotation', which is not in cycle"),
]


@pytest.mark.parametrize("name, flags, match", IGNORED, ids=[f"{n}:{f}" for n, f, _ in IGNORED])
def test_a_flag_the_recipe_would_ignore_is_refused_before_any_work(name, flags, match, tmp_path, monkeypatch):
    import recipes.common as common
    import recipes.redi_two_stage as redi

    monkeypatch.setattr(common.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setattr(redi, "toy_teacher_path", lambda *a, **k: pytest.fail("teacher loaded"))
    argv = ["--output_dir", str(tmp_path / "out"), *shlex.split(flags)]
    with pytest.raises(ValueError, match=re.escape(match)):
        _main(name, argv)


def test_verifier_on_labelled_traces_is_refused(tmp_path):
    from datasets import Dataset

    traces = tmp_path / "labelled"
    Dataset.from_dict({"prompt": ["p"], "completion": ["c"], "answer": [1], "correct": [True]}).save_to_disk(traces)
    with pytest.raises(ValueError, match=r"--verifier 'toy' would be ignored: the traces in .* are already labelled"):
        _main(
            "redi_two_stage",
            ["--output_dir", str(tmp_path / "out"), "--traces_path", str(traces), "--verifier", "toy"],
        )


@pytest.mark.parametrize("name", RECIPES)
def test_an_output_dir_that_is_a_file_is_refused_naming_it(name, tmp_path):
    file = tmp_path / "results.txt"
    file.write_text("keep me")
    with pytest.raises(ValueError, match=rf"--output_dir '{file}' is an existing file, not a folder"):
        _main(name, _argv(name, file))
    with pytest.raises(ValueError, match=rf"--output_dir '{file}/run' lies below '{file}', which is a file"):
        _main(name, _argv(name, file / "run"))
    assert file.read_text() == "keep me"


def test_redi_reuses_traces_in_place_and_never_overwrites_them(tmp_path, monkeypatch):
    from datasets import load_from_disk

    from recipes.common import RunRecord

    out = tmp_path / "run"
    flags = [*shlex.split(STAGE2), "--sft_max_steps", "2", "--sft_batch_size", "4", "--num_toy_prompts", "16"]
    first = _main("redi_two_stage", ["--output_dir", str(out), *flags])
    saved = load_from_disk(str(out / "traces")).to_list()
    # The documented reuse, in the same output folder: works, leaves the traces as they were.
    again = _main(
        "redi_two_stage",
        [
            "--output_dir",
            str(out),
            "--traces_path",
            str(out / "traces"),
            *[f for f in flags if f not in ("--num_toy_prompts", "16")],
        ],
    )
    assert load_from_disk(str(out / "traces")).to_list() == saved and again["pairs"] == first["pairs"]
    # Without --traces_path, the run would overwrite them: refused before any work.
    with pytest.raises(ValueError, match=rf"'{out}/traces' already holds traces from an earlier run.*--traces_path"):
        _main("redi_two_stage", ["--output_dir", str(out), *flags])
    assert load_from_disk(str(out / "traces")).to_list() == saved

    # --skip_sft with a resume starts stage 2 from --model_name_or_path, not from an older <output_dir>/sft.
    (out / "checkpoint-1").mkdir()
    RunRecord.load(out).save(out / "checkpoint-1")  # the record the run wrote at the top level
    started = []

    def stop(path, *args, **kwargs):
        started.append(path)
        raise KeyboardInterrupt

    import recipes.redi_two_stage as recipe

    monkeypatch.setattr(recipe, "redi_stage", stop)
    student = toy_model_path(arch="llama")
    with pytest.raises(KeyboardInterrupt):
        _main(
            "redi_two_stage",
            [
                "--output_dir",
                str(out),
                "--traces_path",
                str(out / "traces"),
                "--skip_sft",
                "--resume_from_checkpoint",
                "true",
                "--model_name_or_path",
                student,
                *shlex.split(STAGE2),
            ],
        )
    assert started == [student]


def test_mora_sft_load_in_4bit_trains_on_a_4bit_base(tmp_path, monkeypatch):
    from peft_ext.mora.layer import MoraLayer

    seen = {}
    real = mora_sft.get_peft_model

    def spy(model, config):
        peft_model = real(model, config)
        layers = [m for m in peft_model.modules() if isinstance(m, MoraLayer)]
        seen["bases"] = {type(m.get_base_layer()).__name__ for m in layers}
        return peft_model

    monkeypatch.setattr(mora_sft, "get_peft_model", spy)
    argv = _argv("mora_sft", tmp_path, "--load_in_4bit", "--use_bnb_nested_quant", "true")
    results = _main("mora_sft", argv)
    assert seen["bases"] == {"Linear4bit"}
    assert (tmp_path / "adapter_model.safetensors").exists() and results["log_history"]
