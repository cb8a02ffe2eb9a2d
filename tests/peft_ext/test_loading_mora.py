"""MoRA loading: broken adapters fail at load, loads are all-or-nothing, PEFT's merge wording."""

import shutil

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_ext import MoraConfig
from peft_ext.mora.layer import MoraLayer
from peft_trl_testbed.models import build_toy_model

SIZES = dict(num_hidden_layers=2, num_attention_heads=4)
TARGETS = ["q_proj", "up_proj"]


def toy(hidden_size=32):
    return build_toy_model(arch="llama", hidden_size=hidden_size, **SIZES).eval()


def logits(model):
    ids = torch.randint(5, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def layers(model):
    return [m for m in model.modules() if isinstance(m, MoraLayer)]


def trained(seed):
    base = toy()  # seeds the RNG itself
    torch.manual_seed(seed)
    return get_peft_model(base, MoraConfig(r=2, target_modules=TARGETS, mora_type="sharing", init_weights=False))


def rewrite(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "adapter_model.safetensors")
    save_file(edit(dict(tensors)), dst / "adapter_model.safetensors")
    return dst


def last_m(tensors):
    return sorted(k for k in tensors if k.endswith(".mora_M"))[-1]


def corrupt_last_module(tmp_path):
    trained(1).save_pretrained(tmp_path / "good")

    def grow(t):  # the last module's M gets the wrong shape: the file is broken there only
        key = last_m(t)
        t[key] = torch.zeros(t[key].shape[0] + 1, t[key].shape[1] + 1)
        return t

    return rewrite(tmp_path / "good", tmp_path / "bad", grow)


# 1 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_adapter_with_nan_or_inf_in_m_is_refused_at_load(tmp_path, bad):
    trained(1).save_pretrained(tmp_path / "good")

    def poison(t):
        key = last_m(t)
        t[key] = t[key].clone()
        t[key][0, 0] = bad
        return t

    rewrite(tmp_path / "good", tmp_path / "bad", poison)
    with pytest.raises(ValueError, match=r"mora_M holds NaN or inf"):
        PeftModel.from_pretrained(toy(), tmp_path / "bad")


# 3 ---------------------------------------------------------------------------------------------
def test_failed_load_over_an_existing_adapter_leaves_the_model_unchanged(tmp_path):
    bad = corrupt_last_module(tmp_path)
    model = trained(7)
    before = logits(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="needs"):
        model.load_adapter(bad, adapter_name="default")
    assert torch.equal(logits(model), before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_failed_load_of_a_new_adapter_leaves_nothing_behind(tmp_path):
    bad = corrupt_last_module(tmp_path)
    model = trained(7)
    before, keys = logits(model), set(model.state_dict())
    with pytest.raises(ValueError, match="needs"):
        model.load_adapter(bad, adapter_name="second")
    assert list(model.peft_config) == ["default"]
    assert all("second" not in m.mora_M for m in layers(model))
    assert set(model.state_dict()) == keys
    assert torch.equal(logits(model), before)


def test_failed_from_pretrained_restores_the_base_model(tmp_path):
    bad = corrupt_last_module(tmp_path)
    base = toy()
    names = [n for n, _ in base.named_modules()]
    with pytest.raises(ValueError, match="needs"):
        PeftModel.from_pretrained(base, bad)
    assert [n for n, _ in base.named_modules()] == names


def test_ignore_mismatched_sizes_still_skips_m_of_another_shape(tmp_path):
    bad = corrupt_last_module(tmp_path)
    with pytest.warns(UserWarning, match="ignore_mismatched_sizes=True"):
        model = PeftModel.from_pretrained(toy(), bad, ignore_mismatched_sizes=True)
    logits(model)


# 8 ---------------------------------------------------------------------------------------------
def test_merge_overflow_uses_peft_wording_and_does_not_blame_m():
    model = get_peft_model(toy().half(), MoraConfig(r=2, target_modules=["q_proj"], mora_type="truncation"))
    layer = layers(model)[0]
    weight = layer.get_base_layer().weight
    with torch.no_grad():
        weight[0, 0] = 60000.0
        layer.mora_M["default"].zero_()
        layer.mora_M["default"][0, 0] = 10000.0  # finite M; 60000 + 10000 overflows fp16
    assert torch.isfinite(layer.mora_M["default"]).all()
    saved = weight.detach().clone()
    with pytest.raises(
        ValueError, match=r"^NaNs detected in the merged weights. The adapter default seems to be broken"
    ):
        layer.merge(safe_merge=True)
    assert torch.equal(weight, saved)
