"""SUBNET loading: broken or foreign adapters and masks fail at load, loads are all-or-nothing, PEFT conventions."""

import copy
import json
import shutil
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_ext import SubnetConfig
from peft_ext.subnet import SubnetLayer
from peft_trl_testbed.models import build_toy_model

SIZES = dict(num_hidden_layers=2, num_attention_heads=4)
TARGETS = ["q_proj", "up_proj"]


def toy(hidden_size=32, **kwargs):
    return build_toy_model(arch="llama", hidden_size=hidden_size, **{**SIZES, **kwargs}).eval()


def inputs():
    return torch.randint(5, 60, (2, 7), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=inputs()).logits


def layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, SubnetLayer)}


def save_adapter(path, base=None, seed=1, **config):
    config = {"target_modules": TARGETS, "density": 0.05, "init_weights": False, "seed": seed, **config}
    model = get_peft_model(base if base is not None else toy(), SubnetConfig(**config))
    model.save_pretrained(path)
    return model


def rewrite(src, dst, edit):
    """Copy an adapter folder, passing its tensors through ``edit(dict) -> dict``."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "adapter_model.safetensors")
    save_file(edit(dict(tensors)), dst / "adapter_model.safetensors")
    return dst


def last_key(tensors, attr):
    return sorted(k for k in tensors if k.endswith(attr))[-1]


def adapter_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# 1 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_adapter_with_nan_or_inf_values_is_refused_at_load(tmp_path, bad):
    save_adapter(tmp_path / "good")

    def poison(t):
        key = last_key(t, ".subnet_values")
        t[key] = t[key].clone()
        t[key][0] = bad
        return t

    rewrite(tmp_path / "good", tmp_path / "bad", poison)
    with pytest.raises(ValueError, match=r"subnet_values holds NaN or inf"):
        PeftModel.from_pretrained(toy(), tmp_path / "bad")


# 2 ---------------------------------------------------------------------------------------------
def test_index_stored_adapter_on_a_base_of_another_shape_is_refused(tmp_path):
    save_adapter(tmp_path / "a", storage="indices")  # trained on a 32-wide model
    with pytest.raises(ValueError, match=r"trained on a weight of shape \(32, 32\).*has shape \(64, 64\)"):
        PeftModel.from_pretrained(toy(hidden_size=64), tmp_path / "a")


# 3 ---------------------------------------------------------------------------------------------
def _corrupt_last_module(tmp_path):
    save_adapter(tmp_path / "good", seed=2)

    def truncate(t):  # the last module's values lose an entry: the file is corrupt there only
        key = last_key(t, ".subnet_values")
        t[key] = t[key][:-1].clone()
        return t

    return rewrite(tmp_path / "good", tmp_path / "bad", truncate)


def test_failed_load_over_an_existing_adapter_leaves_the_model_unchanged(tmp_path):
    bad = _corrupt_last_module(tmp_path)
    model = get_peft_model(toy(), SubnetConfig(target_modules=TARGETS, density=0.05, init_weights=False, seed=7))
    before, state = logits(model), adapter_state(model)
    indices = {n: m.subnet_indices["default"].clone() for n, m in layers(model).items()}
    with pytest.raises(ValueError, match="corrupt"):
        model.load_adapter(bad, adapter_name="default")
    assert torch.equal(logits(model), before)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert all(torch.equal(m.subnet_indices["default"], indices[n]) for n, m in layers(model).items())


def test_failed_load_of_a_new_adapter_leaves_nothing_behind(tmp_path):
    bad = _corrupt_last_module(tmp_path)
    model = get_peft_model(toy(), SubnetConfig(target_modules=TARGETS, density=0.05, init_weights=False, seed=7))
    before, state = logits(model), adapter_state(model)
    with pytest.raises(ValueError, match="corrupt"):
        model.load_adapter(bad, adapter_name="second")
    assert list(model.peft_config) == ["default"]
    assert all("second" not in m.subnet_values and "second" not in m.subnet_indices for m in layers(model).values())
    assert model.state_dict().keys() == state.keys()
    assert torch.equal(logits(model), before)
    model.load_adapter(tmp_path / "good", adapter_name="second")  # the name is free again


def test_failed_from_pretrained_restores_the_base_model(tmp_path):
    bad = _corrupt_last_module(tmp_path)
    base = toy()
    names = [n for n, _ in base.named_modules()]
    with pytest.raises(ValueError, match="corrupt"):
        PeftModel.from_pretrained(base, bad)
    assert [n for n, _ in base.named_modules()] == names
    assert not any(isinstance(m, SubnetLayer) for m in base.modules())


# 5 ---------------------------------------------------------------------------------------------
def test_safe_merge_refuses_an_fp16_overflow_and_leaves_the_weight_alone():
    model = get_peft_model(toy().half(), SubnetConfig(target_modules=["q_proj"], density=0.05))
    layer = next(iter(layers(model).values()))
    weight = layer.get_base_layer().weight
    with torch.no_grad():
        weight.view(-1)[layer.subnet_indices["default"][0]] = 60000.0
        layer.subnet_values["default"].fill_(10000.0)  # finite, but 60000 + 10000 overflows fp16
    saved = weight.detach().clone()
    with pytest.raises(
        ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"
    ):
        layer.merge(safe_merge=True)
    assert torch.equal(weight, saved) and not layer.merged


# 6 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arch", "target", "expected"),
    [("llama", "up_proj", (32, 128)), ("gpt2", "c_attn", (32, 96)), ("llama", "embed_tokens", None)],
)
def test_layers_expose_in_and_out_features(arch, target, expected):
    base = build_toy_model(arch=arch, hidden_size=32, **SIZES)
    model = get_peft_model(base, SubnetConfig(target_modules=[target], density=0.05))
    for layer in layers(model).values():
        base_layer = layer.get_base_layer()
        if expected is None:
            expected = (base_layer.num_embeddings, base_layer.embedding_dim)
        assert (layer.in_features, layer.out_features) == expected


# 7 ---------------------------------------------------------------------------------------------
def test_ignore_mismatched_sizes_skips_the_modules_that_do_not_fit(tmp_path):
    trained = save_adapter(tmp_path / "a", storage="bitmap")
    base = toy(intermediate_size=64)  # up_proj differs (64 x 32 instead of 128 x 32), q_proj fits
    with pytest.raises(ValueError, match="ignore_mismatched_sizes=True"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, tmp_path / "a", ignore_mismatched_sizes=True)
    assert any("up_proj" in str(w.message) and "ignore_mismatched_sizes" in str(w.message) for w in caught)
    saved = layers(trained)
    for name, layer in layers(model).items():
        if "q_proj" in name:
            assert torch.equal(layer.subnet_indices["default"], saved[name].subnet_indices["default"])
            assert torch.equal(layer.subnet_values["default"], saved[name].subnet_values["default"])
        else:  # skipped: keeps what the config creates (random masks at density 0.05), not the saved entries
            assert layer.weight_shape == (64, 32)
            assert layer.subnet_values["default"].numel() == round(0.05 * layer.weight_numel)
    logits(model)  # usable


# 13 --------------------------------------------------------------------------------------------
def test_masks_naming_missing_weights_are_refused():
    base = toy()
    masks = {
        "model.layers.0.self_attn.q_proj.weight": torch.rand(32, 32) > 0.9,
        "model.layers.5.self_attn.q_proj.weight": torch.rand(32, 32) > 0.9,  # there is no layer 5
    }
    with pytest.raises(ValueError, match=r"model\.layers\.5\.self_attn\.q_proj\.weight"):
        get_peft_model(base, SubnetConfig(mask_source=masks))
    assert not any(isinstance(m, SubnetLayer) for m in base.modules())


# 14 --------------------------------------------------------------------------------------------
def test_a_one_dimensional_mask_for_a_matrix_names_the_expected_shape():
    masks = {"model.layers.0.self_attn.q_proj.weight": torch.rand(32 * 32) > 0.9}
    with pytest.raises(ValueError, match=r"has shape \(1024,\).*\(32, 32\) here"):
        get_peft_model(toy(), SubnetConfig(mask_source=masks))


# 15 --------------------------------------------------------------------------------------------
def test_adapter_without_its_mask_key_fails_at_load_naming_it(tmp_path):
    save_adapter(tmp_path / "good", storage="indices")
    bad = rewrite(tmp_path / "good", tmp_path / "bad", lambda t: {k: v for k, v in t.items() if "indices" not in k})
    with pytest.raises(ValueError, match=r"no mask for .*q_proj.*subnet_indices"):
        PeftModel.from_pretrained(toy(), bad)


def test_adapter_keys_for_modules_the_base_lacks_fail_at_load_naming_them(tmp_path):
    save_adapter(tmp_path / "good")

    def move(t):  # layer 1's entries renamed to a layer 3 the base does not have
        return {k.replace("layers.1.", "layers.3."): v for k, v in t.items()}

    bad = rewrite(tmp_path / "good", tmp_path / "bad", move)
    with pytest.raises(ValueError, match=r"has no module 'model\.layers\.3\."):
        PeftModel.from_pretrained(toy(), bad)


# 16 --------------------------------------------------------------------------------------------
def test_loading_never_opens_a_mask_source_path_from_the_config(tmp_path):
    trained = save_adapter(tmp_path / "a")
    decoy = tmp_path / "not-masks.txt"
    decoy.write_text("this is not a masks file\n" * 10)
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["mask_source"] = str(decoy)
    config_path.write_text(json.dumps(config))
    model = PeftModel.from_pretrained(toy(), tmp_path / "a")
    assert model.peft_config["default"].mask_source == "adapter"
    assert torch.equal(logits(model), logits(trained))


# 17 --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["random", "magnitude"])
def test_a_saved_config_recreates_the_adapter(tmp_path, source):
    config = SubnetConfig(target_modules=TARGETS, density=0.05, mask_source=source, seed=3)
    original = get_peft_model(toy(), copy.deepcopy(config))
    config.save_pretrained(tmp_path)
    recreated = get_peft_model(toy(), SubnetConfig.from_pretrained(tmp_path))
    for name, layer in layers(recreated).items():
        assert torch.equal(layer.subnet_indices["default"], layers(original)[name].subnet_indices["default"])
    assert torch.equal(logits(recreated), logits(original))
