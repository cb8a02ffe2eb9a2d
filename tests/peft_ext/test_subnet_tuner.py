"""The SUBNET tuner type: training equivalence, adapter operations, storage, save/load, errors."""

import copy
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from peft_ext import SubnetConfig
from peft_ext.subnet import SubnetLayer, random_masks, save_masks
from peft_trl_testbed.models import build_toy_model, toy_model_path

REPO_ROOT = Path(__file__).resolve().parents[2]
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
TARGETS = {"llama": ["q_proj", "up_proj", "embed_tokens"], "gpt2": ["c_attn", "c_fc"]}


def toy(arch="llama"):
    return build_toy_model(arch=arch, **SIZES).eval()  # no dropout: runs must be comparable


def batch(seed=0, n=3, length=9):
    ids = torch.randint(5, 60, (n, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def subnet_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, SubnetLayer)}


def base_param_name(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.") + ".weight"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_matches_full_finetuning_with_masked_gradients(arch):
    """Slow reference: the full model, gradients multiplied by the mask before an Adam step."""
    base = toy(arch)
    reference = copy.deepcopy(base)
    model = get_peft_model(base, SubnetConfig(target_modules=TARGETS[arch], density=0.1, seed=1))

    masks = {}
    for name, layer in subnet_layers(model).items():
        mask = torch.zeros(layer.weight_numel, dtype=torch.bool)
        mask[layer.subnet_indices["default"]] = True
        masks[base_param_name(name)] = mask.view(layer.weight_shape)
    params = dict(reference.named_parameters())
    for p in reference.parameters():
        p.requires_grad_(False)
    for name, mask in masks.items():
        params[name].requires_grad_(True)
        params[name].register_hook(lambda g, m=mask: g * m)

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == sum(int(m.sum()) for m in masks.values())
    opt = torch.optim.Adam(trainable, lr=1e-2)
    opt_ref = torch.optim.Adam([params[n] for n in masks], lr=1e-2)
    for step in range(3):
        loss = model(**batch(step)).loss
        loss_ref = reference(**batch(step)).loss
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
        loss.backward()
        loss_ref.backward()
        if step == 0:  # dL/dv is the dense gradient at the mask
            for name, layer in subnet_layers(model).items():
                dense = params[base_param_name(name)].grad.reshape(-1)
                idx = layer.subnet_indices["default"]
                torch.testing.assert_close(layer.subnet_values["default"].grad, dense[idx], rtol=1e-5, atol=1e-7)
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()

    # optimizer state only for the k trained values
    for p in trainable:
        assert opt.state[p]["exp_avg"].shape == p.shape == (p.numel(),)
    merged = model.merge_and_unload()
    for name, weight in merged.named_parameters():
        torch.testing.assert_close(weight, params[name], rtol=1e-5, atol=1e-6)
        if name in masks:  # entries outside the mask never move
            assert torch.equal(weight[~masks[name]], params[name][~masks[name]])


def test_trainable_count_is_exactly_the_masked_entries():
    model = get_peft_model(toy(), SubnetConfig(target_modules=["q_proj", "up_proj"], density=0.05))
    expected = 0
    for module_name, module in toy().named_modules():
        if module_name.endswith(("q_proj", "up_proj")):
            expected += max(1, round(0.05 * module.weight.numel()))
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == expected
    assert all(n.endswith("subnet_values.default") for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_and_merge_and_unload_are_exact(arch):
    base = toy(arch)
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, SubnetConfig(target_modules=TARGETS[arch], density=0.2, init_weights=False))
    inputs = batch()["input_ids"]
    with torch.no_grad():
        unmerged = model(input_ids=inputs).logits
        model.merge_adapter()
        assert torch.equal(model(input_ids=inputs).logits, unmerged)
        model.unmerge_adapter()
        for n, p in model.get_base_model().named_parameters():
            if "subnet_values" not in n:
                assert torch.equal(p, original[n.replace(".base_layer", "")])
        with model.disable_adapter():
            plain = model(input_ids=inputs).logits
        assert not torch.equal(plain, unmerged)
        unloaded = model.merge_and_unload()
        assert torch.equal(unloaded(input_ids=inputs).logits, unmerged)
        assert not any(isinstance(m, SubnetLayer) for m in unloaded.modules())


def test_several_adapters_on_one_model():
    base = toy()
    model = get_peft_model(base, SubnetConfig(target_modules=["q_proj", "up_proj"], density=0.1, init_weights=False))
    model.add_adapter("second", SubnetConfig(target_modules=["q_proj"], density=0.3, seed=7, init_weights=False))
    inputs = batch()["input_ids"]
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.subnet_values["second"].numel() == round(0.3 * layer.weight_numel)
    assert not layer.subnet_values["second"].requires_grad  # only the active adapter trains
    with torch.no_grad():
        out_default = model(input_ids=inputs).logits
        model.set_adapter("second")
        out_second = model(input_ids=inputs).logits
        model.base_model.set_adapter(["default", "second"])
        out_both = model(input_ids=inputs).logits
        # reference: both deltas applied to a dense copy of the base weights
        reference = copy.deepcopy(model.get_base_model())
        for module in subnet_layers(reference).values():
            w = module.get_base_layer().weight
            for adapter in ("default", "second"):
                if adapter in module.subnet_values:
                    w.view(-1)[module.subnet_indices[adapter]] += module.subnet_values[adapter]
            module.set_adapter([])
        torch.testing.assert_close(reference(input_ids=inputs).logits, out_both)
        model.merge_adapter(["default", "second"])
        assert torch.equal(model(input_ids=inputs).logits, out_both)
        model.unmerge_adapter()
        assert torch.equal(model(input_ids=inputs).logits, out_both)
    assert not torch.equal(out_default, out_second)


def _trained_adapter(tmp_path, density, storage="auto"):
    base = AutoModelForCausalLM.from_pretrained(toy_model_path(arch="llama", **SIZES))
    model = get_peft_model(
        base, SubnetConfig(target_modules=["q_proj", "up_proj"], density=density, init_weights=False, storage=storage)
    )
    path = tmp_path / "adapter"
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize(("density", "expected"), [(0.01, "indices"), (0.5, "bitmap")])
def test_saved_adapter_stores_the_smaller_encoding(tmp_path, density, expected):
    model, path = _trained_adapter(tmp_path, density)
    saved = load_file(path / "adapter_model.safetensors")
    total_index_bytes = total_values = 0
    for name, layer in subnet_layers(model).items():
        k, numel = layer.subnet_values["default"].numel(), layer.weight_numel
        key = f"{name}.subnet_{expected}"
        tensor = saved[key]
        assert tensor.dtype == (torch.int32 if expected == "indices" else torch.uint8)
        assert tensor.numel() * tensor.element_size() == min(4 * k, math.ceil(numel / 8))
        assert saved[f"{name}.subnet_values"].shape == (k,)
        total_index_bytes += tensor.numel() * tensor.element_size()
        total_values += k
    assert total_index_bytes <= 4 * total_values  # never more than 4 bytes of index per fp32 value
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["mask_source"] == "random" and config["mask_origin"].startswith("random")


def test_fresh_process_reproduces_outputs(tmp_path):
    model, path = _trained_adapter(tmp_path, 0.05)
    inputs = batch()["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
    torch.save(inputs, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import torch
        import peft_ext
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({toy_model_path(arch="llama", **SIZES)!r})
        model = PeftModel.from_pretrained(base, {str(path)!r})
        with torch.no_grad():
            torch.save(model(input_ids=torch.load({str(tmp_path / "inputs.pt")!r})).logits, {str(tmp_path / "out.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO_ROOT, capture_output=True)
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_load_adapter_as_second_adapter_and_trainable(tmp_path):
    model, path = _trained_adapter(tmp_path, 0.05)
    base = AutoModelForCausalLM.from_pretrained(toy_model_path(arch="llama", **SIZES))
    loaded = PeftModel.from_pretrained(base, path, is_trainable=True)
    loaded.load_adapter(path, adapter_name="other")
    for name, layer in subnet_layers(loaded).items():
        original = subnet_layers(model)[name]
        for adapter in ("default", "other"):
            assert torch.equal(layer.subnet_indices[adapter], original.subnet_indices["default"])
            assert torch.equal(layer.subnet_values[adapter], original.subnet_values["default"])
        assert layer.subnet_values["default"].requires_grad


@pytest.mark.parametrize("encoding", ["indices", "bitmap"])
def test_out_of_bounds_mask_in_saved_adapter_is_rejected_before_scatter(tmp_path, encoding):
    _, path = _trained_adapter(tmp_path, 0.01 if encoding == "indices" else 0.5)
    file = path / "adapter_model.safetensors"
    saved = load_file(file)
    key = next(k for k in saved if k.endswith(f"subnet_{encoding}"))
    if encoding == "indices":
        saved[key] = saved[key].clone()
        saved[key][-1] = 10**6
        message = "index 1000000 is out of bounds"
    else:
        saved[key] = torch.cat([saved[key], torch.full((1,), 255, dtype=torch.uint8)])
        message = "bitmap"
    save_file(saved, str(file))
    base = AutoModelForCausalLM.from_pretrained(toy_model_path(arch="llama", **SIZES))
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(base, path)


def test_masks_from_dict_and_file_and_inferred_targets(tmp_path):
    base = toy()
    masks = random_masks(base, density=0.1, seed=3, include=["v_proj", "down_proj"])
    model = get_peft_model(copy.deepcopy(base), SubnetConfig(mask_source=masks))
    assert sorted(model.peft_config["default"].target_modules) == sorted(n.removesuffix(".weight") for n in masks)
    for name, layer in subnet_layers(model).items():
        assert torch.equal(
            layer.subnet_indices["default"], torch.nonzero(masks[base_param_name(name)].flatten()).flatten()
        )
    save_masks(masks, tmp_path / "masks.safetensors")
    from_file = get_peft_model(
        copy.deepcopy(base), SubnetConfig(target_modules=["v_proj"], mask_source=str(tmp_path / "masks.safetensors"))
    )
    assert len(subnet_layers(from_file)) == 2
    model.save_pretrained(tmp_path / "adapter")  # a dict mask_source must not end up in the json
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["mask_origin"] == "dict of 4 masks"


@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan")])
def test_density_outside_unit_interval_is_rejected(density):
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        SubnetConfig(target_modules=["q_proj"], density=density)


def test_mask_shape_mismatch_and_missing_mask_and_bad_source_are_clear_errors(tmp_path):
    base = toy()
    masks = {"model.layers.0.self_attn.q_proj.weight": torch.ones(8, 8, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"shape \(8, 8\) but the weight .* \(32, 32\)"):
        get_peft_model(
            copy.deepcopy(base), SubnetConfig(target_modules=["model.layers.0.self_attn.q_proj"], mask_source=masks)
        )
    with pytest.raises(KeyError, match="no mask for target module"):
        get_peft_model(copy.deepcopy(base), SubnetConfig(target_modules=["k_proj"], mask_source=masks))
    with pytest.raises(ValueError, match="neither one of"):
        SubnetConfig(target_modules=["q_proj"], mask_source=str(tmp_path / "missing.safetensors"))
    model = get_peft_model(copy.deepcopy(base), SubnetConfig(target_modules=["q_proj"], mask_source="adapter"))
    with pytest.raises(RuntimeError, match="no masks were loaded"):
        model(input_ids=batch()["input_ids"])
