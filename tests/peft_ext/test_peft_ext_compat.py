"""peft_ext/_compat.py: each private upstream touch point still behaves as the entry says, and none lives elsewhere."""

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import peft
import pytest
import torch
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType
from peft.utils.save_and_load import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import TrainerCallback

import peft_ext
from peft_ext import _compat
from peft_trl_testbed.models import build_toy_model

PACKAGE = Path(peft_ext.__file__).parent


# ----------------------------------------------------------------------------- add_peft_type
def test_add_peft_type_adds_one_member_once_that_peft_looks_up():
    before = len(PeftType)
    member = _compat.add_peft_type("TEST_COMPAT_ONLY")
    assert len(PeftType) == before + 1 and member in list(PeftType)
    # the lookups PeftConfig.from_pretrained and the PEFT_TYPE_TO_* mappings do
    assert member is PeftType("TEST_COMPAT_ONLY") is PeftType["TEST_COMPAT_ONLY"] is PeftType.TEST_COMPAT_ONLY
    assert member == "TEST_COMPAT_ONLY" and hash(member) == hash("TEST_COMPAT_ONLY") and member.value == member.name
    assert _compat.add_peft_type("TEST_COMPAT_ONLY") is member and len(PeftType) == before + 1


def test_add_peft_type_refuses_a_peft_type_that_is_not_a_str_enum(monkeypatch):
    class NotAnEnum:
        pass

    monkeypatch.setattr(peft.utils, "PeftType", NotAnEnum)
    with pytest.raises(RuntimeError, match=rf"peft {peft.__version__}: PeftType is no longer a str Enum.*pip install"):
        _compat.add_peft_type("ANYTHING")


# ----------------------------------------------------------------------------- set_peft_model_state_dict_arg
def _toy_mora():
    base = build_toy_model(arch="llama", hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    return get_peft_model(base, peft_ext.MoraConfig(r=2, target_modules=["q_proj"]))


@pytest.mark.parametrize("ignore_mismatched_sizes", [True, False])
def test_set_peft_model_state_dict_arg_reads_the_argument_peft_does_not_pass_to_the_hook(
    monkeypatch, ignore_mismatched_sizes
):
    model = _toy_mora()
    seen = []
    original = peft_ext.MoraModel._remap_adapter_state_dict_for_load.__func__

    def remap(cls, **kwargs):
        seen.append(_compat.set_peft_model_state_dict_arg("ignore_mismatched_sizes", default="outside"))
        return original(cls, **kwargs)

    monkeypatch.setattr(peft_ext.MoraModel, "_remap_adapter_state_dict_for_load", classmethod(remap))
    state = get_peft_model_state_dict(model)
    set_peft_model_state_dict(model, state, ignore_mismatched_sizes=ignore_mismatched_sizes)
    assert seen == [ignore_mismatched_sizes]
    assert _compat.set_peft_model_state_dict_arg("ignore_mismatched_sizes", default="outside") == "outside"


def test_set_peft_model_state_dict_arg_refuses_a_renamed_argument():
    def set_peft_model_state_dict(model, state_dict, skip_mismatched=True):  # a future peft's spelling
        return _compat.set_peft_model_state_dict_arg("ignore_mismatched_sizes")

    with pytest.raises(RuntimeError, match="has no argument 'ignore_mismatched_sizes'"):
        set_peft_model_state_dict(None, {})


# ----------------------------------------------------------------------------- BufferDict
def test_buffer_dict_holds_non_persistent_buffers():
    holder = torch.nn.Module()
    holder.indices = _compat.BufferDict({}, persistent=False)
    index = torch.tensor([3, 1])
    holder.indices["default"] = index
    assert "default" in holder.indices and holder.indices["default"] is index
    assert holder.state_dict() == {}  # SubnetModel saves the indices itself, encoded
    holder.to(torch.float64)  # moved and cast with the module like any buffer, integer dtype kept
    assert [name for name, _ in holder.named_buffers()] == ["indices.default"]
    assert holder.indices["default"].dtype == torch.int64


# ----------------------------------------------------------------------------- private hooks
@pytest.mark.parametrize("hook", _compat.PEFT_HOOKS + _compat.TORCH_HOOKS, ids=lambda h: h.name)
def test_peft_hooks_exist_take_the_recorded_parameters_and_are_still_called(hook):
    assert _compat.hook_problem(hook) is None
    if hook.caller is not None:  # an override only takes effect while upstream still calls it
        assert re.search(rf"\.{hook.name}\(", inspect.getsource(_compat._resolve(hook.caller))), hook.caller


# How peft 0.21.2 calls each hook that our tuners override: positional arguments, then keywords.
CALLS = {
    "_create_and_replace": (5, ("current_key",)),  # tuners_utils.py, BaseTuner.inject_adapter
    "_prepare_adapter_config": (2, ()),  # tuners_utils.py, BaseTuner.inject_adapter
    "_get_adapter_state_dict": (0, ("model", "config", "adapter_name", "state_dict", "unwanted_adapter_names")),
    "_remap_adapter_state_dict_for_load": (0, ("model", "config", "adapter_name", "state_dict")),
}


@pytest.mark.parametrize("tuner", [peft_ext.MoraModel, peft_ext.SubnetModel], ids=lambda c: c.__name__)
def test_our_overrides_accept_the_call_peft_makes(tuner):
    overridden = [h.name for h in _compat.PEFT_HOOKS if h.name in vars(tuner)]
    assert "_create_and_replace" in overridden and "_remap_adapter_state_dict_for_load" in overridden
    for name in overridden:
        if name not in CALLS:
            continue
        positional, keywords = CALLS[name]
        function = inspect.getattr_static(tuner, name)
        signature = inspect.signature(function.__func__ if isinstance(function, classmethod) else function)
        leading = ["cls" if isinstance(function, classmethod) else "self"]
        signature.bind(*leading, *range(positional), **dict.fromkeys(keywords))  # raises TypeError on a mismatch


def test_peft_hooks_check_names_each_changed_hook(monkeypatch):
    _compat.check_peft_hooks()
    monkeypatch.delattr(BaseTuner, "_replace_module")
    monkeypatch.setattr(BaseTunerLayer, "_cast_input_dtype", lambda self, inputs, dtype: inputs)
    with pytest.raises(RuntimeError) as error:
        _compat.check_peft_hooks()
    message = str(error.value)
    assert "BaseTuner._replace_module is gone" in message
    assert "BaseTunerLayer._cast_input_dtype takes ['inputs', 'dtype'], expected ['x', 'dtype']" in message
    assert f"peft {peft.__version__}" in message and "pip install" in message


def test_layer_attributes_are_what_peft_properties_read():
    class Layer(BaseTunerLayer):
        pass

    layer = Layer()
    layer._disable_adapters, layer._active_adapter = True, "other"
    assert layer.disable_adapters is True and layer.active_adapter == "other" and layer.active_adapters == ["other"]
    assert set(_compat.PEFT_LAYER_ATTRIBUTES) == {"_disable_adapters", "_active_adapter"}


def test_wrapper_segments_are_torch_s():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_WRAPPED_MODULE
    from torch.distributed.fsdp._common_utils import FSDP_WRAPPED_MODULE

    compiled = torch.compile(torch.nn.Linear(2, 2))  # wrapping only: nothing is compiled before a call
    compile_segment = next(iter(compiled.state_dict())).split(".")[0]
    assert _compat.WRAPPER_SEGMENTS == {FSDP_WRAPPED_MODULE, _CHECKPOINT_WRAPPED_MODULE, compile_segment}


def test_bitsandbytes_private_unpacking_exists():
    functional = pytest.importorskip("bitsandbytes.functional")
    assert callable(functional._convert_weight_packed_for_cpu_inverse)
    assert list(inspect.signature(functional._convert_weight_packed_for_cpu_inverse).parameters)[:2] == [
        "packed_weight",
        "quant_state",
    ]


def _overrides():
    """``{(our class, method name): upstream class}`` for every upstream method a peft_ext class overrides."""
    modules = [importlib.import_module(m.name) for m in pkgutil.walk_packages(peft_ext.__path__, "peft_ext.")]
    classes = {
        c for m in modules for c in vars(m).values() if inspect.isclass(c) and c.__module__.startswith("peft_ext.")
    }
    found = {}
    for cls in classes:
        for name in dir(cls):
            if name.startswith("__"):
                continue
            definers = [c for c in cls.__mro__ if name in vars(c)]
            if not definers or not definers[0].__module__.startswith("peft_ext."):
                continue
            if not isinstance(vars(definers[0])[name], (type(_params), classmethod, staticmethod)):
                continue  # a property or a class attribute, not a method
            upstream = [c for c in definers if not c.__module__.startswith("peft_ext.")]
            # An autograd Function's forward/backward take the arguments we define, by design.
            if upstream and not issubclass(cls, torch.autograd.Function):
                found[(definers[0], name)] = upstream[0]
    return found


def _params(function):
    function = function.__func__ if isinstance(function, (classmethod, staticmethod)) else function
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def test_overrides_with_an_explicit_parameter_list_copy_upstream_s_and_are_listed():
    listed = set(_compat.COPIED_SIGNATURES) | {f"{h.owner}.{h.name}" for h in _compat.PEFT_HOOKS + _compat.TORCH_HOOKS}
    copied = set()
    for (ours, name), upstream in _overrides().items():
        params = _params(inspect.getattr_static(ours, name))
        if any(kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for _, kind, _ in params):
            continue  # passes on whatever upstream adds
        path = f"{upstream.__module__}:{upstream.__qualname__}.{name}"
        assert path in listed, f"{ours.__qualname__}.{name} copies {path}'s parameters: list it in peft_ext/_compat.py"
        if path in _compat.COPIED_SIGNATURES:
            copied.add(path)
        assert params == _params(inspect.getattr_static(upstream, name)), (ours, name)
    assert copied == set(_compat.COPIED_SIGNATURES)  # no stale entry


# ----------------------------------------------------------------------------- nothing private outside _compat.py
def _sources():
    return {p: p.read_text() for p in sorted(PACKAGE.rglob("*.py")) if p.name != "_compat.py"}


def test_private_upstream_names_are_used_only_through_compat():
    """Every underscore name that peft_ext's code defines, calls or sets and that PEFT or torch also has is an entry."""
    upstream = (BaseTuner, BaseTunerLayer, torch.nn.Module, peft.PeftModel, peft.PeftConfig, TrainerCallback)
    listed = {h.name for h in _compat.PEFT_HOOKS + _compat.TORCH_HOOKS} | set(_compat.PEFT_LAYER_ATTRIBUTES)
    unlisted = {}
    for path, text in _sources().items():
        for name in re.findall(r"(?:\.|def\s+)(_[a-z]\w*)", text):
            if name not in listed and any(hasattr(cls, name) for cls in upstream):
                unlisted.setdefault(name, set()).add(path.relative_to(PACKAGE).as_posix())
    assert unlisted == {}, f"add these to peft_ext/_compat.py with a pinning test: {unlisted}"


def test_no_private_imports_frame_reads_or_enum_internals_outside_compat():
    patterns = {
        "private module or name import": r"^\s*from\s+(?!\.|__future__)[\w.]*\b_\w+[\w.]*\s+import|^\s*from\s+(?!\.)\S+\s+import\s+_",
        "frame read": r"_getframe|f_locals|f_back",
        "enum internals": r"_member_map_|_value2member_map_|_member_names_|_add_member_",
        "class attribute assignment on an upstream class": r"^\s*(PeftModel|BaseTuner|BaseTunerLayer|LoraModel)\.\w+\s*=",
    }
    found = [
        f"{path.relative_to(PACKAGE)}:{i}: {what}: {line.strip()}"
        for path, text in _sources().items()
        for i, line in enumerate(text.splitlines(), 1)
        for what, pattern in patterns.items()
        if re.search(pattern, line)
    ]
    assert found == []
