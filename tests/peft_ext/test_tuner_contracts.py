"""PEFT's tuner contracts, checked for every tuner type of this package.

Each row of ``ROWS`` is one way of making an adapter (MoRA; SUBNET with each ``mask_source``); every
contract runs once per row, so a new tuner joins the suite by adding one row. The contracts are those
PEFT checks for its own tuners: several adapters (add, switch, delete, activate together, disable,
names that contain each other, saving a selection), dtypes, merging, state dicts of plain and wrapped
(DDP, FSDP1, FSDP2) models, gradient checkpointing and trainable-parameter reporting. References are
independent of the code under test: the base model's own output, a fresh model loaded from the saved
adapter, closed-form parameter counts, or the same model run without the feature.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_ext import MoraConfig, SubnetConfig
from peft_ext.subnet import random_masks, save_masks
from peft_trl_testbed.models import build_toy_model

MLP_TARGETS = ["lin0", "lin1"]
LLAMA_TARGETS = ["q_proj", "up_proj"]


class MLP(nn.Module):
    """The small model PEFT's own tuner tests use: two linear layers."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 3)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))


def make_mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def make_llama():
    return build_toy_model(arch="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4).eval()


# --------------------------------------------------------------------------- rows
@dataclasses.dataclass
class Row:
    """One tuner type (or mask source): how to make the config of a new adapter.

    ``config(targets, masks, masks_path, seed)`` returns the config; ``masks`` are boolean masks of the
    target weights and ``masks_path`` a file holding them, for the rows that take explicit masks.
    ``loaded=True``: the adapter is not created from a config but saved from a donor model and loaded
    (``mask_source="adapter"`` exists only for adapters read from disk).
    """

    id: str
    config: Callable[..., object]
    loaded: bool = False


def _subnet(**kwargs):
    def make(targets, masks, masks_path, seed):
        return SubnetConfig(target_modules=targets, density=0.3, seed=seed, init_weights=False, **kwargs)

    return make


ROWS = [
    Row("mora", lambda targets, masks, masks_path, seed: MoraConfig(target_modules=targets, r=2, init_weights=False)),
    Row("subnet-random", _subnet()),
    Row("subnet-magnitude", _subnet(mask_source="magnitude")),
    Row(
        "subnet-dict",
        lambda targets, masks, masks_path, seed: SubnetConfig(mask_source=masks, init_weights=False, seed=seed),
    ),
    Row(
        "subnet-file",
        lambda targets, masks, masks_path, seed: SubnetConfig(mask_source=masks_path, init_weights=False, seed=seed),
    ),
    Row("subnet-adapter", _subnet(), loaded=True),
]


@pytest.fixture(params=ROWS, ids=[row.id for row in ROWS])
def row(request):
    return request.param


def attach(model, row: Row, name: str, tmp_path, make_base=make_mlp, seed: int = 0, **kwargs) -> PeftModel:
    """Add adapter ``name`` of ``row`` to ``model`` (a base model or a PeftModel); returns the PeftModel.

    ``kwargs`` go to ``get_peft_model``/``add_adapter`` (or ``from_pretrained``/``load_adapter`` for loaded rows).
    """
    targets = MLP_TARGETS if make_base is make_mlp else LLAMA_TARGETS
    masks = random_masks(make_base(), density=0.3, seed=seed + 11, include=targets)
    masks_path = tmp_path / f"masks-{name}-{seed}.safetensors"
    save_masks(masks, masks_path)
    is_peft = isinstance(model, PeftModel)
    torch.manual_seed(1000 + seed)  # tuners that draw random initial values from the global generator
    if row.loaded:
        donor = get_peft_model(make_base(), row.config(targets, masks, masks_path, seed))
        path = tmp_path / f"donor-{name}-{seed}"
        donor.save_pretrained(path)
        if is_peft:
            model.load_adapter(path, adapter_name=name, is_trainable=True, **kwargs)
            return model
        return PeftModel.from_pretrained(model, path, adapter_name=name, is_trainable=True, **kwargs)
    config = row.config(targets, masks, str(masks_path), seed)
    if is_peft:
        model.add_adapter(name, config, **kwargs)
        return model
    return get_peft_model(model, config, adapter_name=name, **kwargs)


def x_mlp():
    return torch.randn(6, 10, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def out(model, x=None):
    return model(x_mlp() if x is None else x)


def tuner_layers(model):
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def adapter_parameters(model, name):
    """The parameters of adapter ``name``, found through PEFT's layer attributes (not through names)."""
    params = []
    for layer in tuner_layers(model):
        for attr in layer.adapter_layer_names:
            holder = getattr(layer, attr)
            if name in holder:
                params.append(holder[name])
    return params


def base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


# --------------------------------------------------------------------------- adapters
def test_add_set_and_delete_adapters(row, tmp_path):
    base_out = out(make_mlp())
    model = attach(make_mlp(), row, "default", tmp_path, seed=1)
    only_default = out(model)
    attach(model, row, "other", tmp_path, seed=2)
    assert set(model.peft_config) == {"default", "other"}
    assert model.active_adapters == ["default"]
    assert torch.equal(out(model), only_default)  # adding does not activate

    model.set_adapter("other")
    only_other = out(model)
    assert not torch.allclose(only_other, only_default) and not torch.allclose(only_other, base_out)
    assert all(p.requires_grad for p in adapter_parameters(model, "other"))
    assert not any(p.requires_grad for p in adapter_parameters(model, "default"))

    model.delete_adapter("other")
    assert set(model.peft_config) == {"default"} and adapter_parameters(model, "other") == []
    model.set_adapter("default")
    assert torch.equal(out(model), only_default)


def test_several_active_adapters_add_their_weight_updates(row, tmp_path):
    """Both adapters active: each layer computes ``x (W0 + dW_a + dW_b)^T``, with each ``dW`` read off a merge."""
    model = attach(make_mlp(), row, "a", tmp_path, seed=1)
    attach(model, row, "b", tmp_path, seed=2)
    w0 = {
        n: m.get_base_layer().weight.detach().clone() for n, m in model.named_modules() if n.endswith(("lin0", "lin1"))
    }
    deltas = {}
    for name in ("a", "b"):
        model.base_model.set_adapter(name)
        model.merge_adapter()
        for n, m in model.named_modules():
            if n in w0:
                deltas[n, name] = m.get_base_layer().weight.detach() - w0[n]
        model.unmerge_adapter()
    model.base_model.set_adapter(["a", "b"])
    assert model.active_adapters == ["a", "b"]

    ref = make_mlp()
    with torch.no_grad():
        for n in w0:
            layer = getattr(ref, n.rsplit(".", 1)[-1])
            layer.weight.copy_(w0[n] + deltas[n, "a"] + deltas[n, "b"])
    torch.testing.assert_close(out(model), out(ref), atol=1e-5, rtol=1e-5)


def test_disable_adapter_gives_the_base_model(row, tmp_path):
    base_out = out(make_mlp())
    model = attach(make_mlp(), row, "default", tmp_path, seed=1)
    assert not torch.allclose(out(model), base_out)
    with model.disable_adapter():
        assert torch.equal(out(model), base_out)
    assert not torch.allclose(out(model), base_out)


def test_adapter_names_that_contain_each_other_save_and_load_apart(row, tmp_path):
    model = attach(make_mlp(), row, "other", tmp_path, seed=1)
    attach(model, row, "other_2", tmp_path, seed=2)
    expected = {}
    for name in ("other", "other_2"):
        model.set_adapter(name)
        expected[name] = out(model)
    assert not torch.allclose(expected["other"], expected["other_2"])
    model.save_pretrained(tmp_path / "saved")

    for name, folder in (("other", tmp_path / "saved" / "other"), ("other_2", tmp_path / "saved" / "other_2")):
        loaded = PeftModel.from_pretrained(make_mlp(), folder, adapter_name=name)
        torch.testing.assert_close(out(loaded), expected[name], atol=0, rtol=0)
    both = PeftModel.from_pretrained(make_mlp(), tmp_path / "saved" / "other", adapter_name="other")
    both.load_adapter(tmp_path / "saved" / "other_2", adapter_name="other_2")
    for name in ("other", "other_2"):
        both.set_adapter(name)
        torch.testing.assert_close(out(both), expected[name], atol=0, rtol=0)


def test_saving_selected_adapters(row, tmp_path):
    model = attach(make_mlp(), row, "default", tmp_path, seed=1)
    attach(model, row, "other", tmp_path, seed=2)
    model.set_adapter("other")
    expected = out(model)
    model.save_pretrained(tmp_path / "selected", selected_adapters=["other"])
    saved = sorted(p.name for p in (tmp_path / "selected").iterdir() if p.is_dir())
    assert saved == ["other"], saved
    loaded = PeftModel.from_pretrained(make_mlp(), tmp_path / "selected" / "other")
    torch.testing.assert_close(out(loaded), expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="missing"):
        model.save_pretrained(tmp_path / "bad", selected_adapters=["missing"])


# --------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_adapter_dtype_on_a_bf16_base(row, tmp_path, autocast_adapter_dtype):
    """PEFT's contract: with ``autocast_adapter_dtype=True`` a bf16 base gets float32 adapters, else bf16 ones."""
    reference = attach(make_mlp(), row, "default", tmp_path, seed=1)
    state = get_peft_model_state_dict(reference)
    base = make_mlp().to(torch.bfloat16)
    model = attach(base, row, "default", tmp_path, seed=1, autocast_adapter_dtype=autocast_adapter_dtype)
    expected = torch.float32 if autocast_adapter_dtype else torch.bfloat16
    params = adapter_parameters(model, "default")
    assert params and {p.dtype for p in params} == {expected}
    set_peft_model_state_dict(model, state)
    result = out(model, x_mlp().to(torch.bfloat16))
    assert result.dtype == torch.bfloat16
    torch.testing.assert_close(result.float(), out(reference), atol=0.05, rtol=0.05)


def test_forward_under_torch_autocast(row, tmp_path):
    model = attach(make_mlp(), row, "default", tmp_path, seed=1)
    expected = out(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = out(model)
    assert result.dtype == torch.bfloat16
    torch.testing.assert_close(result.float(), expected, atol=0.05, rtol=0.05)


# --------------------------------------------------------------------------- merging
@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_unmerge_and_merge_and_unload(row, tmp_path, safe_merge):
    model = attach(make_mlp(), row, "default", tmp_path, seed=1)
    expected = out(model)
    before = base_weights(model)
    model.merge_adapter(safe_merge=safe_merge)
    assert all(layer.merged for layer in tuner_layers(model))
    torch.testing.assert_close(out(model), expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p.detach(), before[n], atol=1e-6, rtol=0)
    merged = model.merge_and_unload(safe_merge=safe_merge)
    assert isinstance(merged, MLP) and not tuner_layers(merged)
    torch.testing.assert_close(out(merged), expected, atol=1e-5, rtol=1e-5)


def test_safe_merge_detects_nan(row, tmp_path):
    model = attach(make_mlp(), row, "default", tmp_path, seed=1)
    before = base_weights(model)
    with torch.no_grad():
        adapter_parameters(model, "default")[-1].fill_(float("nan"))
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_adapter(safe_merge=True)
    # nothing half-applied: no layer merged, every base weight as before
    assert not any(layer.merged for layer in tuner_layers(model))
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if n in before)
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_and_unload(safe_merge=True)
    assert len(tuner_layers(model)) == 2
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if n in before)


# --------------------------------------------------------------------------- state dicts
def test_state_dict_round_trip_on_a_plain_model(row, tmp_path):
    model = attach(make_mlp(), row, "default", tmp_path, seed=1)
    expected = out(model)
    state = get_peft_model_state_dict(model)
    assert state and not any(".default" in k for k in state)
    fresh = attach(make_mlp(), row, "default", tmp_path, seed=5)
    assert not torch.allclose(out(fresh), expected)
    result = set_peft_model_state_dict(fresh, state)
    assert not result.unexpected_keys
    torch.testing.assert_close(out(fresh), expected, atol=0, rtol=0)


@pytest.fixture(scope="module")
def gloo_group():
    """A one-process gloo group, as DDP and FSDP need one even on a single CPU process."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield dist.group.WORLD
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _round_trip_from(wrapped, state_source, row, tmp_path, expected):
    state = get_peft_model_state_dict(state_source)
    assert not any(w in k for k in state for w in ("_fsdp_wrapped_module", "module.", "_orig_mod")), sorted(state)
    from torch.distributed.tensor import DTensor

    state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}
    fresh = attach(make_mlp(), row, "default", tmp_path, seed=5)
    result = set_peft_model_state_dict(fresh, state)
    assert not result.unexpected_keys
    torch.testing.assert_close(out(fresh), expected, atol=0, rtol=0)
    return fresh


def test_state_dict_of_a_ddp_wrapped_model(row, tmp_path, gloo_group):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = attach(make_mlp(), row, "default", tmp_path, seed=1)
    expected = out(model)
    ddp = DDP(model)
    torch.testing.assert_close(out(ddp), expected, atol=0, rtol=0)
    _round_trip_from(ddp, ddp.module, row, tmp_path, expected)  # PEFT's API takes the unwrapped model


def test_state_dict_of_an_fsdp1_wrapped_model(row, tmp_path, gloo_group):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = attach(make_mlp(), row, "default", tmp_path, seed=1)
    expected = out(model)
    fsdp = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    torch.testing.assert_close(out(fsdp), expected, atol=0, rtol=0)
    _round_trip_from(fsdp, fsdp, row, tmp_path, expected)  # as PEFT's own FSDP test: the wrapped model


def test_state_dict_of_an_fsdp2_model(row, tmp_path, gloo_group):
    from torch.distributed.fsdp import fully_shard

    model = attach(make_mlp(), row, "default", tmp_path, seed=1)
    expected = out(model)
    fully_shard(model)
    torch.testing.assert_close(out(model), expected, atol=0, rtol=0)
    _round_trip_from(model, model, row, tmp_path, expected)


def test_state_dict_of_an_activation_checkpointed_model(row, tmp_path):
    # torch's checkpoint wrapper (as FSDP's activation checkpointing applies it) drops its segment from the
    # state dict's keys: the saved adapter must still hold every trained tensor, under unwrapped names
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    model = attach(make_mlp(), row, "default", tmp_path, seed=1)
    with torch.no_grad():  # trained values, not the seeded initial ones a fresh adapter would also have
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    expected = out(model)
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, BaseTunerLayer))
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_modules())
    torch.testing.assert_close(out(model), expected, atol=0, rtol=0)
    state = get_peft_model_state_dict(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len([k for k in state if "_checkpoint_wrapped_module" not in k]) >= len(trainable), sorted(state)
    fresh = attach(make_mlp(), row, "default", tmp_path, seed=5)
    result = set_peft_model_state_dict(fresh, state)
    assert not result.unexpected_keys
    torch.testing.assert_close(out(fresh), expected, atol=0, rtol=0)


# --------------------------------------------------------------------------- training
def test_gradient_checkpointing_gives_the_same_gradients(row, tmp_path):
    ids = torch.randint(5, 60, (2, 9), generator=torch.Generator().manual_seed(0))

    def grads(checkpointing):
        model = attach(make_llama(), row, "default", tmp_path, make_base=make_llama, seed=1)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain and plain.keys() == checkpointed.keys()
    assert all(g is not None and g.abs().sum() > 0 for g in checkpointed.values())
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], atol=1e-6, rtol=1e-5)


def test_trainable_parameters_are_reported(row, tmp_path, capsys):
    model = attach(make_mlp(), row, "default", tmp_path, seed=1)
    attach(model, row, "other", tmp_path, seed=2)
    base_total = sum(p.numel() for p in MLP().parameters())

    def expected_trainable(name):
        if row.id == "mora":
            # one r_hat x r_hat matrix per layer; r_hat = floor(sqrt((d_in + d_out) * r)), rounded down to even for
            # the rotation operator: lin0 floor(sqrt(30 * 2)) = 7 -> 6, lin1 floor(sqrt(23 * 2)) = 6
            return 6 * 6 + 6 * 6
        # SUBNET: one value per selected entry, counted from the masks themselves
        return sum(int(layer.subnet_indices[name].numel()) for layer in tuner_layers(model))

    both = expected_trainable("default") + expected_trainable("other")
    for name in ("default", "other"):
        model.set_adapter(name)
        trainable, all_params = model.get_nb_trainable_parameters()
        assert trainable == expected_trainable(name) > 0
        assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert all_params == base_total + both
        model.print_trainable_parameters()
        assert f"trainable params: {trainable:,} || all params: {all_params:,}" in capsys.readouterr().out


def test_masks_from_an_adapted_model_name_its_weights(tmp_path):
    """Masks keyed by an adapted model's names (``lin0.base_layer.weight``) fit a second adapter."""
    model = get_peft_model(make_mlp(), SubnetConfig(target_modules=MLP_TARGETS, density=0.3))
    masks = random_masks(model.get_base_model(), density=0.3, seed=3, include=["lin0.base_layer"])
    assert list(masks) == ["lin0.base_layer.weight"]
    model.add_adapter("other", SubnetConfig(mask_source=masks))
    layer = model.base_model.model.lin0
    assert torch.equal(layer.subnet_indices["other"], masks["lin0.base_layer.weight"].flatten().nonzero()[:, 0])
    assert "other" not in model.base_model.model.lin1.subnet_values


def test_unknown_mask_names_are_refused_naming_this_models_weights():
    masks = {"model.layers.0.mlp.up_proj.weight": torch.ones(20, 10, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"such as \['lin0.weight', 'lin1.weight'\]"):
        get_peft_model(make_mlp(), SubnetConfig(mask_source=masks))
    model = get_peft_model(make_mlp(), SubnetConfig(target_modules=MLP_TARGETS))
    with pytest.raises(ValueError, match=r"such as \['lin0.weight', 'lin1.weight'\]"):
        model.add_adapter("other", SubnetConfig(mask_source=masks))
    assert set(model.peft_config) == {"default"}


def test_wrapper_prefixes_in_mask_names_and_saved_keys_are_normalised(tmp_path):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(20, 10, generator=g) < 0.3
    for prefix in ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "base_model.model._checkpoint_wrapped_module."):
        model = get_peft_model(make_mlp(), SubnetConfig(mask_source={f"{prefix}lin0.weight": mask}))
        assert torch.equal(model.base_model.model.lin0.subnet_indices["default"], mask.flatten().nonzero()[:, 0])
    # a compiled model's state dict carries ``_orig_mod.``; the saved keys do not, and load back exactly
    model = get_peft_model(make_mlp(), SubnetConfig(target_modules=MLP_TARGETS, init_weights=False))
    expected = out(model)
    compiled = torch.compile(model)
    state = get_peft_model_state_dict(compiled)
    assert state and not any("_orig_mod" in k for k in state), sorted(state)
    fresh = get_peft_model(make_mlp(), SubnetConfig(target_modules=MLP_TARGETS, seed=7))
    set_peft_model_state_dict(fresh, state)
    torch.testing.assert_close(out(fresh), expected, atol=0, rtol=0)
    # activation checkpointing wraps the adapted layers themselves (``lin0._checkpoint_wrapped_module``)
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from peft_ext.subnet import SubnetLayer

    checkpointed = get_peft_model(make_mlp(), SubnetConfig(target_modules=MLP_TARGETS, init_weights=False, seed=3))
    checkpointed_out = out(checkpointed)
    apply_activation_checkpointing(checkpointed, check_fn=lambda m: isinstance(m, SubnetLayer))
    assert any("_checkpoint_wrapped_module" in n for n, _ in checkpointed.named_modules())
    saved = get_peft_model_state_dict(checkpointed)
    assert saved and not any("_checkpoint_wrapped_module" in k for k in saved), sorted(saved)
    fresh = get_peft_model(make_mlp(), SubnetConfig(target_modules=MLP_TARGETS, seed=7))
    set_peft_model_state_dict(fresh, saved)
    torch.testing.assert_close(out(fresh), checkpointed_out, atol=0, rtol=0)
    # loading into a wrapped model puts the values where its state dict has them
    wrapped = torch.compile(get_peft_model(make_mlp(), SubnetConfig(target_modules=MLP_TARGETS, seed=7)))
    result = set_peft_model_state_dict(wrapped, state)
    assert not result.unexpected_keys
    assert torch.equal(
        wrapped._orig_mod.base_model.model.lin0.subnet_values["default"],
        model.base_model.model.lin0.subnet_values["default"],
    )
