"""Mixed-adapter batches: ``model(x, adapter_names=[...])`` and ``generate(..., adapter_names=[...])``.

PEFT's contract (as LoRA implements it): row ``i`` of the batch is computed with adapter
``adapter_names[i]`` alone, or with the base model for ``"__base__"``, whatever adapters are active.
``PeftModel.forward``/``generate`` hand ``adapter_names`` to the tuner's ``_enable_peft_forward_hooks``
context; that context installs a forward pre-hook on every tuner layer which passes the list on as a
keyword argument, and each layer splits its input into one sub-batch per adapter.

The pieces here are shared by the MoRA and SUBNET tuners: the context (:func:`adapter_names_hooks`),
the per-layer check (:func:`check_layer_adapter_names`) and the sub-batch split (:func:`sub_batches`).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from functools import partial

import torch
from peft.utils.other import AuxiliaryTrainingWrapper

BASE = "__base__"


def sub_batches(adapter_names: list[str], device=None) -> dict[str, torch.Tensor]:
    """``{adapter name: row indices}`` in order of first appearance, e.g. ``["a", "b", "a"]`` -> a: [0, 2], b: [1]."""
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(adapter_names):
        rows.setdefault(name, []).append(i)
    return {name: torch.tensor(idx, dtype=torch.long, device=device) for name, idx in rows.items()}


def check_adapter_names_type(adapter_names) -> list[str]:
    """``adapter_names`` as a list of str, or a ``TypeError`` naming what was passed."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError(
            f"adapter_names must be a list of adapter names, one per row of the batch (or '__base__'), got "
            f"{type(adapter_names).__name__} {adapter_names!r}; e.g. adapter_names=['default', '__base__']."
        )
    bad = [n for n in adapter_names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"adapter_names must hold str, got {bad[0]!r} ({type(bad[0]).__name__}).")
    return list(adapter_names)


def check_layer_adapter_names(layer, x: torch.Tensor, adapter_names: list[str], kind: str) -> None:
    """Refuse ``adapter_names`` where a layer cannot honour them: wrong length, merged or disabled adapters."""
    if len(x) != len(adapter_names):
        raise ValueError(
            f"adapter_names has {len(adapter_names)} entries but the batch reaching this {kind} layer has {len(x)} rows; "
            "give one adapter name per row (with generate(num_beams=k) or num_return_sequences=k, one per prompt)."
        )
    if layer.merged:
        raise ValueError(
            f"Cannot pass adapter_names while {kind} adapters {layer.merged_adapters} are merged into the base weights; "
            "call model.unmerge_adapter() first."
        )
    if layer.disable_adapters:
        raise ValueError(
            f"Cannot pass adapter_names while the {kind} adapters are disabled; leave the disable_adapter() context, "
            "or name '__base__' for the rows that should use the base model."
        )


def generation_expand_size(generate_kwargs: dict) -> int:
    """How many times ``generate`` repeats each prompt: max(num_beams, num_return_sequences), as transformers does."""
    config = generate_kwargs.get("generation_config")
    sizes = [1]
    for key in ("num_beams", "num_return_sequences"):
        value = generate_kwargs.get(key, getattr(config, key, None))
        if isinstance(value, int):
            sizes.append(value)
    return max(sizes)


def _inject_adapter_names(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


@contextmanager
def adapter_names_hooks(tuner, layer_cls, known_adapters: Iterable[str], kind: str, adapter_names, **generate_kwargs):
    """Context in which every ``layer_cls`` module (and modules_to_save wrapper) of ``tuner`` gets ``adapter_names``.

    Refuses, before any forward: training mode (dropout and gradients per sub-batch are not supported),
    names that no layer has (typos), and a non-list. With ``generate(num_beams=k)`` or
    ``num_return_sequences=k`` in ``generate_kwargs``, each prompt's name is repeated k times, as
    ``generate`` repeats the prompt.
    """
    if adapter_names is None:
        yield
        return
    adapter_names = check_adapter_names_type(adapter_names)
    if tuner.training:
        raise ValueError(
            "Cannot pass adapter_names when the model is in training mode; call model.eval() first (mixed-adapter "
            "batches are for inference)."
        )
    known = set(known_adapters)
    unknown = sorted({n for n in adapter_names if n != BASE} - known)
    if unknown:
        raise ValueError(
            f"adapter_names names {unknown}, which no {kind} layer of this model has; the adapters are "
            f"{sorted(known)} (or '__base__' for the base model)."
        )
    expand = generation_expand_size(generate_kwargs)
    if expand > 1:
        adapter_names = [name for name in adapter_names for _ in range(expand)]
    handles = []
    try:
        for module in tuner.modules():
            if isinstance(module, (layer_cls, AuxiliaryTrainingWrapper)):
                hook = partial(_inject_adapter_names, adapter_names=adapter_names)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


class MixedBatchMixin:
    """Mixin for a ``BaseTuner`` whose layers (``tuner_layer_cls``) take ``adapter_names`` in ``forward``.

    ``PeftModel.forward``/``generate`` enter :meth:`_enable_peft_forward_hooks`; calling the tuner
    itself (``peft_model.base_model(x, adapter_names=...)``) goes through the same context, so the
    argument is never dropped on the way.
    """

    mixed_batch_kind = "adapter"

    def _mixed_batch_adapters(self) -> set[str]:
        """Every adapter name some tuner layer holds."""
        attr = self.tuner_layer_cls.adapter_layer_names[0]
        return {name for m in self.model.modules() if isinstance(m, self.tuner_layer_cls) for name in getattr(m, attr)}

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Route ``adapter_names`` (one adapter per row, or ``"__base__"``) to every tuner layer, as PEFT's LoRA does."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        known = self._mixed_batch_adapters()
        with adapter_names_hooks(self, self.tuner_layer_cls, known, self.mixed_batch_kind, adapter_names, **kwargs):
            yield

    def forward(self, *args, **kwargs):
        with self._enable_peft_forward_hooks(*args, **kwargs):
            kwargs.pop("adapter_names", None)
            return self.model(*args, **kwargs)
