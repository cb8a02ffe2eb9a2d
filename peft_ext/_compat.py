"""Every private upstream name that ``peft_ext`` touches, in one place.

When peft, torch or bitsandbytes release, this file is the one place to look. Each entry names the
upstream version and file it mirrors, and the test that pins it (in ``tests/peft_ext/test_peft_ext_compat.py``
unless named otherwise):

- :func:`add_peft_type`: adds members to PEFT's ``PeftType`` enum (peft 0.21.2,
  ``peft/utils/peft_types.py``; CPython 3.11 ``enum`` internals, ``EnumType._add_member_`` where it
  exists). ``test_add_peft_type_*``.
- :func:`set_peft_model_state_dict_arg`: reads an argument of ``set_peft_model_state_dict`` from its
  frame (peft 0.21.2, ``peft/utils/save_and_load.py``). ``test_set_peft_model_state_dict_arg_*``.
- :data:`BufferDict`: the private ``peft.tuners._buffer_dict`` module (peft 0.21.2).
  ``test_buffer_dict_holds_non_persistent_buffers``.
- :data:`PEFT_HOOKS`, :data:`PEFT_LAYER_ATTRIBUTES`: private ``BaseTuner``/``BaseTunerLayer``/``PeftModel``
  methods and attributes that the tuners override, call or set (peft 0.21.2, ``peft/tuners/tuners_utils.py``,
  ``peft/peft_model.py``, ``peft/utils/save_and_load.py``). ``test_peft_hooks_*``, ``test_layer_attributes_*``.
- :data:`COPIED_SIGNATURES`: public PEFT methods that our classes override with upstream's explicit parameter
  list (peft 0.21.2, ``peft/tuners/tuners_utils.py``, ``peft/config.py``). ``test_overrides_*``.
- :data:`TORCH_HOOKS`: ``nn.Module._load_from_state_dict`` (torch 2.13, ``torch/nn/modules/module.py``).
  ``test_peft_hooks_*``.
- :data:`WRAPPER_SEGMENTS`: the names torch's FSDP1, activation-checkpoint and ``torch.compile`` wrappers
  insert into parameter names (torch 2.13). ``test_wrapper_segments_are_torch_s``.
- :func:`unpack_cpu_4bit_weight`, :func:`was_repacked_4bit`: bitsandbytes' private CPU weight unpacking and the
  fields its repacking records (bitsandbytes 0.50.2, ``bitsandbytes/nn/modules.py``, ``bitsandbytes/functional.py``).
  ``tests/peft_ext/test_quantized.py::test_eval_forwards_keep_the_4bit_layout_that_training_uses``.

:func:`check_peft_hooks` runs when a tuner type is registered (at ``import peft_ext``), so a release that
renames or reshapes one of these hooks fails at import, naming it, instead of later during training.
The one import-time effect of ``peft_ext`` is that registration; no upstream class is patched.
"""

from __future__ import annotations

import enum
import sys
from typing import NamedTuple

import peft
import torch

# peft 0.21.2, peft/tuners/_buffer_dict.py: the ModuleDict-like container of SubnetLayer's index buffers.
from peft.tuners._buffer_dict import BufferDict

__all__ = [
    "BufferDict",
    "COPIED_SIGNATURES",
    "PEFT_HOOKS",
    "PEFT_LAYER_ATTRIBUTES",
    "TORCH_HOOKS",
    "WRAPPER_SEGMENTS",
    "add_peft_type",
    "check_peft_hooks",
    "set_peft_model_state_dict_arg",
    "unpack_cpu_4bit_weight",
    "was_repacked_4bit",
]

PEFT_MIRRORED = "0.21.2"
TORCH_MIRRORED = "2.13"


def _install_hint(library: str, mirrored: str) -> str:
    from ._versions import requirement

    return (
        f"peft_ext mirrors {library} {mirrored} here (peft_ext/_compat.py); install a supported release: "
        f'pip install "{requirement(library)}".'
    )


# ----------------------------------------------------------------------------- PeftType members
def add_peft_type(name: str):
    """Return ``PeftType[name]``, adding the member to PEFT's ``PeftType`` enum if it is missing.

    PEFT's public ``register_peft_method`` (peft 0.21.2, ``peft/utils/peft_types.py``) only accepts
    names that are already ``PeftType`` members, and offers no call to add one, so a tuner type
    defined outside PEFT has to extend the enum itself. This writes a new member the way
    ``enum.Enum`` builds its own (``_member_map_``, ``_member_names_``, ``_value2member_map_``, as in
    CPython 3.11; through ``EnumType._add_member_`` on versions that have it).

    Raises:
        RuntimeError: if ``PeftType`` is no longer a ``str`` Enum with those internals.
    """
    from peft.utils import PeftType

    if not (isinstance(PeftType, enum.EnumMeta) and issubclass(PeftType, str)):
        raise RuntimeError(
            f"peft {peft.__version__}: PeftType is no longer a str Enum, so {name!r} cannot be added to it. "
            + _install_hint("peft", PEFT_MIRRORED)
        )
    if name in PeftType.__members__:
        return PeftType[name]
    needed = ("_member_map_", "_value2member_map_", "_member_names_")
    missing = [attr for attr in needed if not hasattr(PeftType, attr)]
    if missing:
        raise RuntimeError(
            f"peft {peft.__version__}: the PeftType enum lacks {missing}, so {name!r} cannot be added to it. "
            + _install_hint("peft", PEFT_MIRRORED)
        )
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    if hasattr(PeftType, "_add_member_"):  # Python >= 3.13
        PeftType._add_member_(name, member)
    else:
        # EnumType.__setattr__ refuses to rebind members, so bind the attribute first.
        type.__setattr__(PeftType, name, member)
        PeftType._member_map_[name] = member
        PeftType._member_names_.append(name)
    PeftType._value2member_map_[name] = member
    return member


# ----------------------------------------------------------------------------- set_peft_model_state_dict's arguments
def set_peft_model_state_dict_arg(name: str, default=False):
    """The value of ``name`` in the enclosing ``set_peft_model_state_dict`` call (``default`` outside one).

    peft 0.21.2 (``peft/utils/save_and_load.py``) calls the tuner's ``_remap_adapter_state_dict_for_load``
    from ``set_peft_model_state_dict`` but applies ``ignore_mismatched_sizes`` only afterwards, without
    passing it to the hook; the hook needs it to tell a skippable size mismatch from an error, so it is
    read from that call's frame.

    Raises:
        RuntimeError: if a ``set_peft_model_state_dict`` frame is on the stack but has no local ``name``
            (peft renamed the argument: reading the default there would be silently wrong).
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "set_peft_model_state_dict":
            if name not in frame.f_locals:
                raise RuntimeError(
                    f"peft {peft.__version__}: set_peft_model_state_dict has no argument {name!r} any more. "
                    + _install_hint("peft", PEFT_MIRRORED)
                )
            return frame.f_locals[name]
        frame = frame.f_back
    return default


# ----------------------------------------------------------------------------- private hooks we override or call
class Hook(NamedTuple):
    """A private upstream method that a tuner overrides or calls, and what of it the tuner relies on.

    ``params``: the leading parameter names (after ``self``/``cls``) our code passes or receives.
    ``caller``: ``"module:qualname"`` of the upstream function that must still call the hook for an
    override to take effect (``None`` for a hook we only call).
    """

    owner: str
    name: str
    params: tuple[str, ...]
    use: str
    caller: str | None = None


PEFT_HOOKS: tuple[Hook, ...] = (
    # peft 0.21.2, peft/tuners/tuners_utils.py (BaseTuner)
    Hook(
        "peft.tuners.tuners_utils:BaseTuner",
        "_create_and_replace",
        ("peft_config", "adapter_name", "target", "target_name", "parent", "current_key"),
        "MoraModel, SubnetModel override",
        "peft.tuners.tuners_utils:BaseTuner.inject_adapter",
    ),
    Hook(
        "peft.tuners.tuners_utils:BaseTuner",
        "_prepare_adapter_config",
        ("peft_config", "model_config"),
        "SubnetModel overrides",
        "peft.tuners.tuners_utils:BaseTuner.inject_adapter",
    ),
    Hook(
        "peft.tuners.tuners_utils:BaseTuner",
        "_replace_module",
        ("parent", "child_name", "new_module", "child"),
        "MoraModel, SubnetModel call",
    ),
    Hook(
        "peft.tuners.tuners_utils:BaseTuner",
        "_get_adapter_state_dict",
        ("model", "config", "adapter_name", "state_dict", "unwanted_adapter_names"),
        "MoraModel, SubnetModel override (classmethod)",
        "peft.utils.save_and_load:get_peft_model_state_dict",
    ),
    Hook(
        "peft.tuners.tuners_utils:BaseTuner",
        "_remap_adapter_state_dict_for_load",
        ("model", "config", "adapter_name", "state_dict"),
        "MoraModel, SubnetModel override (classmethod)",
        "peft.utils.save_and_load:set_peft_model_state_dict",
    ),
    # peft 0.21.2, peft/peft_model.py: PeftModel enters the tuner's context when the tuner defines one
    Hook(
        "peft.peft_model:PeftModel",
        "_enable_peft_forward_hooks",
        (),
        "MixedBatchMixin defines it on the tuner",
        "peft.peft_model:PeftModel._enable_peft_forward_hooks",
    ),
    # peft 0.21.2, peft/tuners/tuners_utils.py (BaseTunerLayer)
    Hook(
        "peft.tuners.tuners_utils:BaseTunerLayer",
        "_move_adapter_to_device_of_base_layer",
        ("adapter_name",),
        "MoraLayer calls",
    ),
    Hook("peft.tuners.tuners_utils:BaseTunerLayer", "_cast_input_dtype", ("x", "dtype"), "MoraLayer calls"),
)

# Attributes of BaseTunerLayer (peft 0.21.2, peft/tuners/tuners_utils.py) that our layers set in __init__ and
# set_adapter, as PEFT's own layers do: the public property that reads each one.
PEFT_LAYER_ATTRIBUTES: dict[str, str] = {"_disable_adapters": "disable_adapters", "_active_adapter": "active_adapter"}

TORCH_HOOKS: tuple[Hook, ...] = (
    # torch 2.13, torch/nn/modules/module.py: MoraLinear reads its saved layer shape before the state dict is applied
    Hook(
        "torch.nn:Module",
        "_load_from_state_dict",
        ("state_dict", "prefix", "local_metadata", "strict"),
        "MoraLayer overrides",
        "torch.nn:Module.load_state_dict",
    ),
)


# Public upstream methods that our classes override with an explicit parameter list, copied from upstream (no
# *args/**kwargs that would pass on a parameter upstream adds later): peft 0.21.2, peft/tuners/tuners_utils.py
# and peft/config.py. Private hooks with explicit parameters are in PEFT_HOOKS.
COPIED_SIGNATURES: tuple[str, ...] = (
    "peft.tuners.tuners_utils:BaseTuner.merge_adapter",  # AtomicSafeMergeMixin (MoraModel, SubnetModel)
    "peft.tuners.tuners_utils:BaseTuner.merge_and_unload",  # AtomicSafeMergeMixin
    "peft.tuners.tuners_utils:BaseTunerLayer.merge",  # MoraLayer, SubnetLayer
    "peft.tuners.tuners_utils:BaseTunerLayer.unmerge",  # MoraLayer, SubnetLayer
    "peft.tuners.tuners_utils:BaseTunerLayer.delete_adapter",  # SubnetLayer
    "peft.config:PeftConfigMixin.to_dict",  # SubnetConfig
)


def _resolve(path: str):
    module_name, _, qualname = path.partition(":")
    obj = sys.modules.get(module_name) or __import__(module_name, fromlist=["_"])
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def hook_problem(hook: Hook) -> str | None:
    """What about ``hook`` no longer holds upstream (``None`` if it still matches)."""
    import inspect

    owner = _resolve(hook.owner)
    function = getattr(owner, hook.name, None)
    if function is None:
        return f"{hook.owner.partition(':')[2]}.{hook.name} is gone"
    params = [
        p.name
        for p in inspect.signature(function).parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in ("self", "cls")
    ]
    if tuple(params[: len(hook.params)]) != hook.params:
        return f"{hook.owner.partition(':')[2]}.{hook.name} takes {params}, expected {list(hook.params)} first"
    return None


def check_peft_hooks() -> None:
    """Raise ``RuntimeError`` naming every hook of :data:`PEFT_HOOKS` and :data:`TORCH_HOOKS` that changed upstream."""
    problems = [p for p in map(hook_problem, PEFT_HOOKS + TORCH_HOOKS) if p]
    from peft.tuners.tuners_utils import BaseTunerLayer

    problems += [
        f"BaseTunerLayer.{attr} is no longer what {prop} reads"
        for attr, prop in PEFT_LAYER_ATTRIBUTES.items()
        if not hasattr(BaseTunerLayer, attr) or not isinstance(getattr(BaseTunerLayer, prop, None), property)
    ]
    if problems:
        raise RuntimeError(
            f"peft {peft.__version__} / torch {torch.__version__}: private hooks that peft_ext's tuners rely on "
            f"changed: {'; '.join(problems)}. "
            + _install_hint("peft", PEFT_MIRRORED)
            + f" (torch hooks mirror torch {TORCH_MIRRORED}.)"
        )


# ----------------------------------------------------------------------------- torch wrapper names
# Segments that torch's wrappers insert into parameter names (torch 2.13): FSDP1
# (torch/distributed/fsdp/_common_utils.py, FSDP_WRAPPED_MODULE), activation checkpointing
# (torch/distributed/algorithms/_checkpoint/checkpoint_wrapper.py, _CHECKPOINT_WRAPPED_MODULE) and
# torch.compile (torch/_dynamo/eval_frame.py, OptimizedModule._orig_mod).
WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


# ----------------------------------------------------------------------------- bitsandbytes
def unpack_cpu_4bit_weight(weight) -> bool:
    """Undo bitsandbytes' CPU inference repacking of a ``Params4bit`` in place; True if it was repacked.

    bitsandbytes 0.50.2 (``bitsandbytes/nn/modules.py``, ``Linear4bit.forward``) repacks a 4-bit weight into
    a bf16 CPU kernel layout on the first eval-mode forward on CPUs with AVX512-BF16, and
    ``dequantize_4bit`` does not read that layout. bitsandbytes itself undoes it with the private
    ``bitsandbytes.functional._convert_weight_packed_for_cpu_inverse`` when it saves (``_save_to_state_dict``, so
    also on ``state_dict()``). That inverse leaves the block scales (``absmax``) of a weight without double
    quantisation transposed, ``(in / blocksize, out)`` in bf16, where ``dequantize_4bit`` reads them row-major:
    restored here in fp32, also after bitsandbytes' own inverse ran (their values stay rounded to bf16). Pinned by
    ``tests/peft_ext/test_quantized.py::test_unpacking_a_repacked_4bit_layer``.
    """
    state = weight.quant_state
    repacked = bool(getattr(state, "packing_format_for_cpu", False))
    if repacked:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        state = weight.quant_state
    if was_repacked_4bit(state) and not state.nested and state.absmax.dim() == 2:
        state.absmax = state.absmax.T.reshape(-1).float().contiguous()
    return repacked


def was_repacked_4bit(quant_state) -> bool:
    """Whether bitsandbytes ever repacked the weight of this 4-bit ``QuantState`` for its CPU kernel, undone or not:
    the repacking (``bitsandbytes.functional._convert_weight_packed_for_cpu``, 0.50.2) records ``original_nested``
    and the other fields it changes, and rounds the block scales to bf16 for good."""
    return getattr(quant_state, "packing_format_for_cpu", False) or hasattr(quant_state, "original_nested")
