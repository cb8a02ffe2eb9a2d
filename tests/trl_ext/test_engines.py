"""Every trainer and tuner under DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 takes DDP's step (2 CPU processes, gloo).

One ``torchrun`` launch trains Prefix Grouper GRPO, REDI, Q-Tuning (2 accumulated micro-batches), SFT with
MoRA (GPT-2, Conv1D) and SFT with SUBNET (Llama, magnitude masks) for one plain-SGD step under each engine,
on the same seeded data; the script asserts the world size, accelerate's distributed type and the wrapper of
every run (``check_engine``). SGD moves the weights by ``lr * gradient``, so a gradient that is scaled, lost or
averaged differently shows in the weights.

Tolerance: the engines run the same float32 arithmetic and differ only in how the two processes' gradients
are summed (all-reduce, reduce-scatter, flattened buckets), which changes rounding only: the measured gaps
are at most ~3e-7 of the update. ``RTOL = 1e-5`` leaves a margin of 30x on that and is still 1000x below a
1% scale error (a lost renormalisation, for example, moved Q-Tuning's weights by 0.36x DDP's).
"""

import json
from pathlib import Path

import pytest
import torch
from distributed_helpers import run_distributed
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_trl_testbed import pretrained_toy_model_path, toy_model_path

SCRIPT = str(Path(__file__).with_name("_engines_train.py"))
ENGINES = ("zero2", "zero3", "fsdp2")
METHODS = ("prefix_grouper", "prefix_sharing_dpo", "redi", "qtuning", "sft_mora", "sft_subnet")
RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch: DDP first (the reference), then the three engines, in the same two processes."""
    root = tmp_path_factory.mktemp("engines")
    build_toy_models()
    run_distributed(SCRIPT, str(root), ",".join(("ddp", *ENGINES)), engines=True, timeout=900)
    return root


def build_toy_models() -> None:
    """Build the launch's toy models here first: under ZeRO-3 init the processes could not build them."""
    from _engines_train import GPT2, ZERO3_MODELS

    toy_model_path(), toy_model_path(**GPT2), pretrained_toy_model_path()
    for sizes in ZERO3_MODELS.values():
        if sizes:
            toy_model_path(**sizes)


def _norm(tensors: dict, keys) -> float:
    return float(sum(tensors[k].double().norm() ** 2 for k in keys) ** 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", METHODS)
def test_one_sgd_step_equals_ddp(runs, method, engine):
    init = load_file(runs / "ddp" / f"{method}.init.safetensors")
    ddp = load_file(runs / "ddp" / f"{method}.safetensors")
    ours = load_file(runs / engine / f"{method}.safetensors")
    keys = sorted(init)
    assert keys and set(keys) <= set(ours), f"{engine} trained other parameters: {sorted(set(keys) - set(ours))[:3]}"
    update = _norm({k: ddp[k] - init[k] for k in keys}, keys)
    assert update > 1e-2, f"the DDP step barely moved the weights ({update:.2e}); the comparison would be blind"
    gap = _norm({k: ours[k] - ddp[k] for k in keys}, keys) / update
    ratio = _norm({k: ours[k] - init[k] for k in keys}, keys) / update
    assert gap <= RTOL, (
        f"{method} under {engine}: weights differ from DDP's by {gap:.2e} of the update (ratio {ratio})"
    )
    assert ours["loss"].item() == pytest.approx(ddp["loss"].item(), rel=RTOL, abs=1e-7)


def _single_process_adapters(arch: str, tuner: str):
    from _engines_train import ZERO3_MODELS, ZERO3_TUNERS

    sizes = ZERO3_MODELS[arch]
    path = toy_model_path(**sizes) if sizes else pretrained_toy_model_path()
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), ZERO3_TUNERS[tuner](arch))
    shapes = {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    indices = {n: b for n, b in model.named_buffers() if "subnet_indices" in n}
    return shapes, indices


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("tuner", ["mora", "subnet"])
def test_adapters_built_under_zero3_init_equal_single_process(runs, arch, tuner):
    info = json.loads((runs / "zero3" / "zero3_init.json").read_text())[f"{arch}/{tuner}"]
    saved = load_file(runs / "zero3" / "zero3_init.safetensors")
    shapes, indices = _single_process_adapters(arch, tuner)
    assert info["shapes"] == shapes and shapes
    for name, expected in indices.items():  # magnitude masks: chosen on the gathered weights
        assert torch.equal(saved[f"{arch}/{tuner}/{name}"], expected), name
    # Merging needs the whole base weight, which ZeRO-3 holds in partitions outside a gather.
    assert "DeepSpeed ZeRO-3 holds only a partition" in info["merge"] and "GatheredParameters" in info["merge"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft_mora", "sft_subnet"])
def test_zero3_adapters_save_gathered_and_refuse_partitions(runs, method):
    trained = load_file(runs / "zero3" / f"{method}.safetensors")
    saved = load_file(runs / "zero3" / f"{method}_adapter" / "adapter_model.safetensors")
    values = {k: v for k, v in saved.items() if k.rpartition(".")[2] in ("mora_M", "subnet_values")}
    assert values
    for key, value in values.items():  # PEFT drops the adapter name from the saved keys
        torch.testing.assert_close(value, trained[f"{key}.default"], rtol=0, atol=0, msg=key)
    refusal = json.loads((runs / "zero3" / f"{method}_direct_save.json").read_text())["refusal"]
    assert refusal is not None and "DeepSpeed ZeRO-3" in refusal and "Trainer.save_model" in refusal


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft_mora", "sft_subnet"])
def test_zero3_vllm_weight_sync_pushes_the_merged_model_and_unmerges(runs, method):
    """TRL gathers the partitioned weights, merges, pushes and unmerges; compare with merge_and_unload on one
    process of the base model plus the adapter that save_model wrote (which also checks that it loads)."""
    from _engines_train import GPT2

    base = toy_model_path(**GPT2) if method == "sft_mora" else pretrained_toy_model_path()
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(runs / "zero3" / f"{method}_adapter")
    )
    unadapted = {n: p.detach().clone() for n, p in AutoModelForCausalLM.from_pretrained(base).named_parameters()}
    expected = dict(model.merge_and_unload().named_parameters())
    pushed = load_file(runs / "zero3" / f"{method}_vllm.safetensors")
    assert set(pushed) == set(expected), sorted(set(pushed) ^ set(expected))[:5]
    for name, tensor in pushed.items():
        torch.testing.assert_close(tensor, expected[name].detach(), rtol=1e-6, atol=1e-7, msg=name)
    assert sum(not torch.equal(pushed[n], unadapted[n]) for n in pushed) >= 3  # the adapted weights, merged
    after = json.loads((runs / "zero3" / f"{method}_vllm.json").read_text())
    assert after["still_merged"] == [] and after["state_gap"] <= 1e-6, after


@pytest.mark.slow
def test_mora_recipe_runs_under_zero3(runs):
    """The recipe evaluates and measures the update's rank outside the trainer: both gather the partitions."""
    results = json.loads((runs / "zero3" / "mora_recipe.json").read_text())
    assert 0.0 <= results["accuracy_before"] <= 1.0 and 0.0 <= results["accuracy_after"] <= 1.0
    assert results["update_rank"] > results["lora_rank_same_params"], results  # a full M, not an empty partition
