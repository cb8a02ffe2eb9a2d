"""MoRA as a PEFT tuner type: layers, adapter operations, save/load, errors."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from mora_reference import reference_delta_weight, reference_rotation_forward
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import peft_ext
from peft_ext import MoraConfig, MoraModel
from peft_ext.mora import MoraLinear
from peft_ext.mora.ops import MORA_TYPES
from peft_trl_testbed.models import toy_model_path

REPO_ROOT = Path(__file__).resolve().parents[2]
SIZES = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
# (d_in, d_out, r) incl. r_hat > d_in, d_out < r_hat, non-square and tiny layers
LAYER_SHAPES = [(32, 24, 4), (4, 64, 8), (64, 4, 8), (7, 13, 3), (1, 1, 1), (3, 2, 16)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_base(kind: str, d_in: int, d_out: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return torch.nn.Linear(d_in, d_out)
    layer = Conv1D(d_out, d_in)  # transformers' Conv1D(nf=out, nx=in), weight (in, out)
    torch.nn.init.normal_(layer.weight, std=0.2)
    return layer


def toy_peft_model(arch="llama", **config):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(toy_model_path(arch=arch, **SIZES))
    config.setdefault("target_modules", "all-linear")
    config.setdefault("init_weights", False)
    return get_peft_model(base, MoraConfig(**config)).eval()


IDS = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- layer math
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mora_type", MORA_TYPES)
@pytest.mark.parametrize("d_in,d_out,r", LAYER_SHAPES)
def test_delta_weight_is_exact_effect_of_forward(kind, mora_type, d_in, d_out, r):
    base = make_base(kind, d_in, d_out)
    layer = MoraLinear(base, "default", MoraConfig(r=r, mora_type=mora_type, init_weights=False))
    M = layer.mora_M["default"]
    assert M.shape[0] == M.shape[1] and M.dtype == torch.float32
    x = torch.randn(3, 4, d_in)
    with torch.no_grad():
        effect = layer(x) - base(x)
        delta = layer.get_delta_weight("default")
    weight = delta.T if kind == "conv1d" else delta  # Conv1D stores (in, out)
    assert rel_err(x @ weight.T, effect) <= 1e-6
    torch.testing.assert_close(
        weight.double(), reference_delta_weight(M, d_in, d_out, mora_type), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mora_type", MORA_TYPES)
def test_merge_then_unmerge_restores_base_weight(kind, mora_type):
    base = make_base(kind, 24, 40)
    original = base.weight.detach().clone()
    layer = MoraLinear(base, "default", MoraConfig(r=4, mora_type=mora_type, init_weights=False))
    x = torch.randn(5, 24)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge(safe_merge=True)
        assert layer.merged
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-6)
        layer.unmerge()
    torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-6)


def test_zero_init_is_a_no_op_and_only_M_is_trainable():
    model = toy_peft_model(init_weights=True, r=4)
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(IDS).logits
    torch.testing.assert_close(model(IDS).logits, base_logits, rtol=0, atol=0)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    layers = [m for m in model.modules() if isinstance(m, MoraLinear)]
    assert len(trainable) == len(layers) == 7  # q, k, v, o, gate, up, down
    for name, p in trainable.items():
        assert name.endswith("mora_M.default") and p.shape[0] == p.shape[1] and torch.all(p == 0)
    lora_params = sum(4 * (m.in_features + m.out_features) for m in layers)
    assert sum(p.numel() for p in trainable.values()) <= lora_params


def test_dropout_applies_to_input_before_compression():
    base = make_base("linear", 16, 16)
    layer = MoraLinear(base, "default", MoraConfig(r=2, mora_type="sharing", mora_dropout=0.5, init_weights=False))
    # Independent reference: the dense update built entry by entry from the operator's definition.
    delta_w = reference_delta_weight(layer.mora_M["default"], 16, 16, "sharing")
    x = torch.randn(4, 16)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)
    assert (dropped == 0).any() and (dropped != 0).any()
    expected = base(x).double() + dropped.double() @ delta_w.T
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    # Dropout on the output (or none at all) would give a different result.
    assert not torch.allclose(out.double(), base(x).double() + x.double() @ delta_w.T, atol=1e-3)
    layer.eval()
    torch.testing.assert_close(layer(x).double(), base(x).double() + x.double() @ delta_w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_rotation_layer_equals_rotating_the_activations_in_float64(kind):
    layer = MoraLinear(make_base(kind, 40, 24).double(), "default", MoraConfig(r=2, init_weights=False)).double()
    M = layer.mora_M["default"]
    assert layer.mora_type["default"] == "rotation" and M.shape == (10, 10)
    for tokens in (3, 30):  # fewer tokens than r_hat = 10 (the chunks are rotated), and more (M's blocks)
        x = torch.randn(2, tokens // 2 + tokens % 2, 40, dtype=torch.float64, requires_grad=True)
        out = layer(x)
        expected = layer.base_layer(x) + reference_rotation_forward(x, M, 24)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        grad = torch.randn_like(out)
        for a, e in zip(torch.autograd.grad(out, (x, M), grad), torch.autograd.grad(expected, (x, M), grad)):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_rope_tables_are_cached_per_adapter_and_dtype():
    layer = MoraLinear(make_base("linear", 32, 32), "a", MoraConfig(r=2, init_weights=False))
    layer.update_layer("b", MoraConfig(r=4, init_weights=False))
    layer.set_adapter(["a", "b"])
    x = torch.randn(2, 32)
    layer(x)
    assert set(layer.mora_rope_cache) == {"a", "b"}
    cos_a, _ = next(iter(layer.mora_rope_cache["a"].values()))
    cos_b, _ = next(iter(layer.mora_rope_cache["b"].values()))
    assert cos_a.shape[-1] == layer.mora_r_hat["a"] // 2 != cos_b.shape[-1] == layer.mora_r_hat["b"] // 2
    layer.double()
    layer(x.double())
    assert {key[1] for key in layer.mora_rope_cache["a"]} == {torch.float32, torch.float64}
    assert "mora_rope_cache" not in "".join(layer.state_dict())  # never saved


# ----------------------------------------------------------------------------- model operations
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_and_unload_matches_adapter_output(arch):
    model = toy_peft_model(arch=arch, mora_type="rotation", r=4)
    with torch.no_grad():
        adapted = model(IDS).logits
        with model.disable_adapter():
            base = model(IDS).logits
        assert (adapted - base).abs().max() > 1e-3
        merged = model.merge_and_unload()
        assert not any(isinstance(m, MoraLinear) for m in merged.modules())
        torch.testing.assert_close(merged(IDS).logits, adapted, rtol=1e-4, atol=1e-5)


def test_merge_adapter_and_unmerge_adapter_round_trip():
    model = toy_peft_model(mora_type="decoupling")
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        adapted = model(IDS).logits
        model.merge_adapter()
        torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-4, atol=1e-5)
        model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)


def test_several_adapters_set_adapter_and_delete_adapter():
    model = toy_peft_model(mora_type="sharing")
    model.add_adapter("other", MoraConfig(r=2, mora_type="rotation", target_modules="all-linear", init_weights=False))
    model.eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert set(layer.mora_M) == {"default", "other"}
    assert layer.mora_type == {"default": "sharing", "other": "rotation"}
    with torch.no_grad():
        with model.disable_adapter():
            base = model(IDS).logits
        first = model(IDS).logits
        model.set_adapter("other")
        assert layer.mora_M["other"].requires_grad and not layer.mora_M["default"].requires_grad
        second = model(IDS).logits
        assert (first - second).abs().max() > 1e-3 and (second - base).abs().max() > 1e-3
        model.base_model.set_adapter(["default", "other"])  # both at once
        both = model(IDS).logits
        # each adapter adds its own delta; compare against merging both into the weights
        model.merge_adapter(["default", "other"])
        torch.testing.assert_close(model(IDS).logits, both, rtol=1e-4, atol=1e-5)
        model.unmerge_adapter()
        model.set_adapter("default")
        model.delete_adapter("other")
        assert set(layer.mora_M) == {"default"} and "other" not in layer.mora_type
        assert "other" not in layer.mora_rope_cache
        assert "other" not in model.peft_config
        torch.testing.assert_close(model(IDS).logits, first)


def test_modules_to_save_are_trained_and_saved(tmp_path):
    model = toy_peft_model(r=2, modules_to_save=["lm_head"])
    assert any(p.requires_grad and "lm_head" in n for n, p in model.named_parameters())
    model.save_pretrained(tmp_path)
    assert any("lm_head" in k for k in load_file(tmp_path / "adapter_model.safetensors"))


def test_bias_option_trains_biases():
    model = toy_peft_model(arch="gpt2", bias="mora_only", r=2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.endswith("base_layer.bias") for n in trainable)


# ----------------------------------------------------------------------------- errors
def test_config_errors_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"mora_type='rope'.*use one of"):
        MoraConfig(mora_type="rope")
    with pytest.raises(ValueError, match=r"mora_type=5"):
        MoraConfig(mora_type=5)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=rf"r={bad} must be a positive integer"):
            MoraConfig(r=bad)
    with pytest.raises(ValueError, match="mora_dropout=1.5"):
        MoraConfig(mora_dropout=1.5)
    with pytest.raises(ValueError, match="bias='lora_only'"):
        MoraConfig(bias="lora_only")
    assert MoraConfig(mora_type=6).mora_type == "rotation"
    assert MoraConfig(mora_type=1).mora_type == "sharing"


def test_unsupported_target_module_type_is_a_clear_error():
    base = AutoModelForCausalLM.from_pretrained(toy_model_path(arch="gpt2", **SIZES))
    with pytest.raises(
        TypeError, match=r"'transformer.wte' has type Embedding.*torch.nn.Linear and transformers Conv1D"
    ):
        get_peft_model(base, MoraConfig(target_modules=["wte", "c_attn"]))


def test_loading_adapter_onto_wrong_base_shape_is_a_clear_error(tmp_path):
    model = toy_peft_model(r=4)
    model.save_pretrained(tmp_path)
    other = AutoModelForCausalLM.from_pretrained(toy_model_path(arch="llama", hidden_size=64, num_hidden_layers=1))
    with pytest.raises(ValueError, match=r"the adapter was trained on a \d+->\d+ layer .*base_model_name_or_path"):
        PeftModel.from_pretrained(other, tmp_path)
    other = AutoModelForCausalLM.from_pretrained(toy_model_path(arch="llama", hidden_size=64, num_hidden_layers=1))
    with pytest.warns(UserWarning, match="ignore_mismatched_sizes=True"):
        PeftModel.from_pretrained(other, tmp_path, ignore_mismatched_sizes=True)


# ----------------------------------------------------------------------------- save / load
LOAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import peft_ext  # registers MORA
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    adapter, base_path, ids_path, expected_path = sys.argv[1:]
    ids, expected = torch.load(ids_path), torch.load(expected_path)
    for low_cpu_mem_usage in (False, True):
        base = AutoModelForCausalLM.from_pretrained(base_path)
        model = PeftModel.from_pretrained(base, adapter, low_cpu_mem_usage=low_cpu_mem_usage).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-6)
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(auto(ids).logits, expected, rtol=0, atol=1e-6)
    print("reloaded", type(auto.base_model).__name__, auto.peft_config["default"].mora_type)
    """
)


def test_save_pretrained_then_load_in_fresh_process(tmp_path):
    model = toy_peft_model(arch="gpt2", mora_type=6, r=4, task_type="CAUSAL_LM")
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    assert (adapter / "adapter_model.safetensors").exists()
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert tensors and all(k.endswith((".mora_M", ".mora_shape")) for k in tensors)
    assert sum(k.endswith(".mora_M") for k in tensors) == sum(k.endswith(".mora_shape") for k in tensors)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "MORA" and config["mora_type"] == "rotation" and config["r"] == 4
    with torch.no_grad():
        torch.save(IDS, tmp_path / "ids.pt")
        torch.save(model(IDS).logits, tmp_path / "expected.pt")
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    base_path = toy_model_path(arch="gpt2", **SIZES)
    args = [
        sys.executable,
        str(script),
        str(adapter),
        base_path,
        str(tmp_path / "ids.pt"),
        str(tmp_path / "expected.pt"),
    ]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reloaded MoraModel rotation" in proc.stdout


def test_registered_as_peft_type():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MORA] is MoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.MORA] is MoraModel
    assert peft_ext.MoraConfig is MoraConfig


# ---------------------------------------------------------------------------- layer shapes in the saved adapter
def _mlp_toy(intermediate_size: int):
    from peft_trl_testbed.models import build_toy_model

    return build_toy_model(arch="llama", intermediate_size=intermediate_size, **SIZES).eval()


def _toy_logits(model) -> torch.Tensor:
    ids = torch.randint(5, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _saved_mlp_adapter(tmp_path, intermediate_size: int = 128):
    config = MoraConfig(r=2, mora_type="sharing", target_modules=["up_proj", "down_proj"])  # M = 0 when created
    model = get_peft_model(_mlp_toy(intermediate_size), config)
    torch.manual_seed(1)
    with torch.no_grad():  # "trained" values
        for name, param in model.named_parameters():
            if "mora_M" in name:
                param.normal_(std=0.05)
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def test_saved_adapter_records_each_layer_shape_and_refuses_another_base_with_the_same_r_hat(tmp_path):
    from peft_ext.mora.ops import mora_rank

    # 32 + 128 and 32 + 129 give the same r_hat at r=2, so M alone cannot tell the two bases apart.
    assert mora_rank(32, 128, 2, "sharing") == mora_rank(32, 129, 2, "sharing") == 17
    model, path = _saved_mlp_adapter(tmp_path)
    saved = load_file(path / "adapter_model.safetensors")
    for name, module in model.named_modules():
        if isinstance(module, MoraLinear):
            d_out, d_in = module.get_base_layer().weight.shape
            assert saved[f"{name}.mora_shape"].tolist() == [d_in, d_out]
    with pytest.raises(
        ValueError,
        match=r"down_proj.mora_shape: the adapter was trained on a 128->32 layer "
        r"\(in_features->out_features\), but 'model.layers.0.mlp.down_proj' is "
        r"129->32\. Load it onto the base model it was trained on",
    ):
        PeftModel.from_pretrained(_mlp_toy(129), path)
    # The same base loads, and gives the trained model's outputs.
    torch.testing.assert_close(_toy_logits(PeftModel.from_pretrained(_mlp_toy(128), path)), _toy_logits(model))


def test_ignore_mismatched_sizes_skips_layers_saved_for_other_sizes(tmp_path):
    _, path = _saved_mlp_adapter(tmp_path)
    base = _mlp_toy(129)
    reference = _toy_logits(base)
    with pytest.warns(UserWarning, match=r"saved for a 32->128 layer, this one is 32->129"):
        loaded = PeftModel.from_pretrained(base, path, ignore_mismatched_sizes=True)
    # Every adapted layer was skipped, so its M stays zero and the model is the base model.
    torch.testing.assert_close(_toy_logits(loaded), reference)


def test_an_adapter_saved_without_layer_shapes_still_loads(tmp_path):
    from safetensors.torch import save_file

    model, path = _saved_mlp_adapter(tmp_path)
    old = {k: v for k, v in load_file(path / "adapter_model.safetensors").items() if not k.endswith(".mora_shape")}
    save_file(old, path / "adapter_model.safetensors", metadata={"format": "pt"})
    torch.testing.assert_close(_toy_logits(PeftModel.from_pretrained(_mlp_toy(128), path)), _toy_logits(model))


def test_another_r_on_the_same_layers_is_named_as_such(tmp_path):
    _, path = _saved_mlp_adapter(tmp_path)
    other = get_peft_model(
        _mlp_toy(128), MoraConfig(r=4, mora_type="sharing", target_modules=["up_proj", "down_proj"])
    )
    with pytest.raises(
        ValueError, match=r"The layer sizes match, so the adapter was saved with another r or mora_type"
    ):
        other.load_adapter(path, "default", is_trainable=True)


# ---------------------------------------------------------------------------- merge precision
def _adapted_weights(model) -> dict[str, torch.Tensor]:
    return {
        n: m.get_base_layer().weight.detach().clone() for n, m in model.named_modules() if isinstance(m, MoraLinear)
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_unmerge_restores_the_base_bit_for_bit_in_half_precision(dtype):
    def build(exact: bool):
        base = toy_model_path(arch="llama", **SIZES)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        config = MoraConfig(r=4, mora_type="rotation", target_modules="all-linear", exact_unmerge=exact)
        model = get_peft_model(model, config)
        torch.manual_seed(3)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "mora_M" in name:
                    param.normal_(std=0.02)
        return model

    exact, plain = build(True), build(False)
    original = _adapted_weights(exact)
    assert all(torch.equal(original[n], w) for n, w in _adapted_weights(plain).items())
    for round_trip in range(3):
        exact.merge_adapter()
        plain.merge_adapter()
        if round_trip == 0:  # merging is the same with or without the option: the same merged weights
            assert all(torch.equal(w, _adapted_weights(plain)[n]) for n, w in _adapted_weights(exact).items())
        exact.unmerge_adapter()
        plain.unmerge_adapter()
    assert all(torch.equal(original[n], w) for n, w in _adapted_weights(exact).items())
    # Without the option the subtraction leaves rounding drift in the base (what the option is for).
    drifted = sum(int((original[n] != w).sum()) for n, w in _adapted_weights(plain).items())
    assert drifted > 0
    assert not any(m._mora_merge_backup for m in exact.modules() if isinstance(m, MoraLinear))  # copies freed


def test_exact_unmerge_with_a_second_adapter_merged_on_top():
    base = AutoModelForCausalLM.from_pretrained(toy_model_path(arch="llama", **SIZES), dtype=torch.bfloat16)
    model = get_peft_model(base, MoraConfig(r=4, target_modules=["q_proj"], exact_unmerge=True, init_weights=False))
    model.add_adapter("other", MoraConfig(r=2, target_modules=["q_proj"], init_weights=False))
    original = _adapted_weights(model)
    model.base_model.merge_adapter(["default", "other"])
    model.unmerge_adapter()  # newest first: "other" subtracted, then "default" restored exactly
    assert all(torch.equal(original[n], w) for n, w in _adapted_weights(model).items())
    loaded_config = MoraConfig.from_peft_type(**model.peft_config["default"].to_dict())
    assert loaded_config.exact_unmerge is True
    with pytest.raises(ValueError, match="exact_unmerge='yes' must be True or False"):
        MoraConfig(exact_unmerge="yes")
