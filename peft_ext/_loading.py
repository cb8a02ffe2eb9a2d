"""Helpers shared by the tuners' adapter loading: all-or-nothing loads and names of wrapped models.

PEFT loads an adapter in two steps: ``PeftModel.load_adapter`` first adds the adapter (for a new
name), then ``set_peft_model_state_dict`` calls the tuner's ``_remap_adapter_state_dict_for_load``
and ``load_state_dict``. Our tuners validate every saved tensor inside the remap hook, before any
module is touched, so a bad file raises with the model unchanged. When the adapter was added by
that same load, it is removed again so no half-registered adapter stays behind.
"""

from __future__ import annotations

import warnings

from ._compat import WRAPPER_SEGMENTS

_PENDING = "_peft_ext_pending_load"


def mark_loaded_config(config) -> None:
    """Mark a config read from disk: its adapter is about to be added and filled by a load."""
    config.__dict__[_PENDING] = True


def take_pending_mark(config) -> bool:
    """Whether ``config`` came from disk and has not been loaded into yet; clears the mark."""
    return bool(config.__dict__.pop(_PENDING, False))


def warn_skipped(skipped: list[str]) -> None:
    """PEFT's warning for weights left out under ``ignore_mismatched_sizes=True``."""
    if skipped:
        warnings.warn(
            "Some adapter weights were not loaded because their shapes do not match the model and "
            f"ignore_mismatched_sizes=True was passed: {skipped}. These modules keep their current adapter state.",
            stacklevel=3,
        )


def discard_new_adapter(model, adapter_name: str) -> None:
    """Remove an adapter that a failed load had just added, restoring the model as it was before the load.

    ``model`` is what ``set_peft_model_state_dict`` received: a ``PeftModel`` (or a model with
    injected layers, which is left alone). When the adapter is the only one, the tuner layers are
    unloaded, so the base model's modules are back in place.
    """
    peft_config = getattr(model, "peft_config", None)
    tuner = getattr(model, "base_model", None)
    if not isinstance(peft_config, dict) or adapter_name not in peft_config or not hasattr(tuner, "unload"):
        return
    if len(peft_config) == 1:
        tuner.unload()
        peft_config.clear()
    else:
        model.delete_adapter(adapter_name)


# ----------------------------------------------------------------------------- names of wrapped models
# Prefixes that only ever lead a name: PeftModel's, and DDP's ``module`` (elsewhere it may be a real module name).
_LEADING_PREFIXES = (("base_model", "model"), ("module",))


def strip_wrappers(name: str) -> str:
    """``name`` as the unwrapped base model names it.

    Drops the segments that FSDP1, activation checkpointing and ``torch.compile`` insert anywhere in a
    name, and the leading ``module.`` (DDP) and ``base_model.model.`` (PeftModel), so that names taken
    from a wrapped model, its state dict or a masks file compare equal.
    """
    parts = [part for part in name.split(".") if part not in WRAPPER_SEGMENTS]
    changed = True
    while changed:
        changed = False
        for prefix in _LEADING_PREFIXES:
            if len(parts) > len(prefix) and tuple(parts[: len(prefix)]) == prefix:
                parts, changed = parts[len(prefix) :], True
    return ".".join(parts)


def saved_key(key: str) -> str:
    """A saved adapter key without wrapper segments; led by ``base_model.model.`` when the model is a PeftModel."""
    parts = [part for part in key.split(".") if part not in WRAPPER_SEGMENTS]
    if parts[:1] == ["module"]:
        parts = parts[1:]
    stripped = strip_wrappers(key)
    return f"base_model.model.{stripped}" if parts[:2] == ["base_model", "model"] else stripped


def adapter_tensor_key(to_return: dict, state_dict: dict, module_name: str, param_key: str, what: str) -> str:
    """The key in ``to_return`` of ``module_name``'s adapter tensor ``param_key`` (e.g. ``"mora_M.default"``).

    PEFT selects adapter tensors by module names; a wrapper whose state dict drops its segment (activation
    checkpointing) hides them from that selection, so a missed tensor is taken from ``state_dict`` by its
    unwrapped name and added to ``to_return``.

    Raises:
        RuntimeError: naming ``what`` when neither dict holds it.
    """
    wanted = strip_wrappers(f"{module_name}.{param_key}")
    for source in (to_return, state_dict):
        for key in source:
            if key.endswith(param_key) and strip_wrappers(key) == wanted:
                to_return[key] = source[key]
                return key
    raise RuntimeError(
        f"the state dict passed to get_peft_model_state_dict has no {what} of {module_name!r} (expected a key "
        f"ending in {wanted!r}); pass the model's own state dict, or none."
    )
