from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from typing import Literal

from peft.config import PeftConfig
from peft.utils import PeftType

from .._loading import mark_loaded_config

BUILTIN_SOURCES = ("random", "magnitude", "adapter")


@dataclass
class SubnetConfig(PeftConfig):
    """Configuration of a [`SubnetModel`]: train only a sparse subnetwork of each target weight.

    For every target weight ``W0`` and boolean mask ``m`` with ``k`` selected entries, only ``k``
    values ``v`` are trained and the layer uses ``W = W0 + scatter(m, v)`` ("Reinforcement
    Learning Finetunes Small Subnetworks in Large Language Models", Mukherjee et al., 2025).
    The masks are saved with the adapter, so loading it never re-runs a selector.

    Args:
        target_modules (`list[str]` or `str`, *optional*):
            Names (suffixes) or a regex of the ``nn.Linear``, GPT-2 ``Conv1D`` or ``nn.Embedding``
            modules to adapt, or ``"all-linear"``. May be left out when ``mask_source`` holds masks:
            then every module that has a mask is adapted.
        exclude_modules (`list[str]` or `str`, *optional*):
            Names or a regex of modules never to adapt.
        density (`float`, defaults to 0.05):
            Fraction in ``(0, 1]`` of each target weight to train, used by the ``"random"`` and
            ``"magnitude"`` mask sources (masks given as files or dicts carry their own density).
        mask_source (`str` or `dict`, defaults to `"random"`):
            Where the masks come from: ``"random"`` (uniform, seeded), ``"magnitude"`` (largest
            ``|W0|``), a path to a masks ``.safetensors`` file written by the selectors
            (``python -m peft_ext.subnet diff ...``, :func:`~peft_ext.subnet.save_masks`), or a dict
            ``{parameter name: bool tensor}`` as returned by the selectors. A saved config keeps
            ``"random"`` and ``"magnitude"`` (so it recreates the same masks on the same base model) and
            records a file or dict as ``"adapter"``: the masks are read from the adapter weights when
            loading, and a path in a loaded config is never opened.
        seed (`int`, defaults to 0):
            Seed of the ``"random"`` masks (and of ``init_weights=False``); each weight draws from
            a generator seeded by ``(seed, module name)``.
        init_weights (`bool`, defaults to `True`):
            Start the trained values at zero so the adapted model equals the base model. ``False``
            draws small random values instead (for tests).
        storage (`str`, defaults to `"auto"`):
            How masks are written into the saved adapter: ``"auto"`` picks per tensor the smaller
            of sorted flat ``int32`` indices (``int64`` for tensors of 2**31 or more entries) and a
            packed 1-bit-per-parameter bitmap; ``"indices"`` or ``"bitmap"`` force one.
        mask_origin (`str`, *optional*):
            Provenance of the masks, filled in on save (e.g. ``"random(density=0.05, seed=0)"``).
        modules_to_save (`list[str]`, *optional*):
            Modules apart from the subnet layers to train fully and save.

    Example:
        ```py
        >>> from transformers import AutoModelForCausalLM, LlamaConfig
        >>> from peft import get_peft_model
        >>> from peft_ext import SubnetConfig
        >>> base = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128))
        >>> model = get_peft_model(base, SubnetConfig(target_modules=["q_proj", "up_proj"], density=0.05))
        >>> model.print_trainable_parameters()  # exactly the masked entries
        ```
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "Module names or a regex of nn.Linear / Conv1D / nn.Embedding modules to adapt, e.g. "
                "['q_proj', 'up_proj'] or 'all-linear'. Optional when mask_source holds masks."
            )
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of modules never to adapt."}
    )
    density: float = field(
        default=0.05,
        metadata={"help": "Fraction in (0, 1] of each target weight to train with the 'random'/'magnitude' masks."},
    )
    mask_source: str | dict = field(
        default="random",
        metadata={
            "help": (
                "'random', 'magnitude', a path to a masks .safetensors file, or a dict {parameter name: bool tensor} "
                "from the selectors. Saved adapters record 'adapter': masks are read from the adapter weights."
            )
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the 'random' masks and of init_weights=False."})
    init_weights: bool = field(
        default=True, metadata={"help": "Start the trained values at zero (True) or small random values (False)."}
    )
    storage: Literal["auto", "indices", "bitmap"] = field(
        default="auto",
        metadata={
            "help": (
                "Mask encoding in the saved adapter: 'auto' (smaller of int32/int64 indices and a packed bitmap), "
                "'indices' or 'bitmap'."
            )
        },
    )
    mask_origin: str | None = field(
        default=None, metadata={"help": "Provenance of the masks, recorded when the adapter is saved."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules apart from the subnet layers to train fully and save."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType["SUBNET"]
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)) or not 0 < self.density <= 1:
            raise ValueError(
                f"density={self.density!r} is outside (0, 1]; pass the fraction of each target weight to train, "
                "e.g. density=0.05."
            )
        if self.storage not in ("auto", "indices", "bitmap"):
            raise ValueError(f"storage={self.storage!r} is unknown; use 'auto', 'indices' or 'bitmap'.")
        source = self.mask_source
        if isinstance(source, (str, os.PathLike)):
            source = os.fspath(source)
            self.mask_source = source
            if source not in BUILTIN_SOURCES and not os.path.isfile(source):
                raise ValueError(
                    f"mask_source={source!r} is neither one of {list(BUILTIN_SOURCES)} nor an existing masks file; "
                    "pass 'random', 'magnitude', a dict of masks, or the path written by "
                    "`python -m peft_ext.subnet diff ... --out masks.safetensors`."
                )
        elif not isinstance(source, dict):
            raise TypeError(
                f"mask_source of type {type(source).__name__} is not supported; pass a str or a dict "
                "{parameter name: bool tensor}."
            )

    def describe_mask_source(self) -> str:
        """A short JSON-safe description of ``mask_source`` (a dict of tensors is not serialisable)."""
        source = self.mask_source
        if isinstance(source, dict):
            return f"dict of {len(source)} masks"
        if source == "random":
            return f"random(density={self.density}, seed={self.seed})"
        if source == "magnitude":
            return f"magnitude(density={self.density})"
        return source

    def to_dict(self) -> dict:
        """The config as a dict; a dict ``mask_source`` is replaced by its description."""
        if isinstance(self.mask_source, dict):
            shallow = copy.copy(self)
            shallow.mask_source = self.describe_mask_source()
            return asdict(shallow)
        return asdict(self)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Save the config so that it recreates the adapter's masks on its own where it can.

        ``"random"`` and ``"magnitude"`` are kept: with the same base model, ``density`` and ``seed``
        they give the same masks again. A masks file or dict is recorded as ``mask_source="adapter"``
        (the masks live in the saved adapter weights, and a path may not exist elsewhere) with the
        origin in ``mask_origin``; such a config needs its adapter weights
        (``PeftModel.from_pretrained``), and used alone it raises at the first forward.
        """
        saved = copy.copy(self)
        if self.mask_source not in ("random", "magnitude", "adapter"):
            saved.mask_origin = self.describe_mask_source()
            saved.mask_source = "adapter"
        elif self.mask_source != "adapter":
            saved.mask_origin = self.describe_mask_source()
        super(SubnetConfig, saved).save_pretrained(save_directory, **kwargs)

    @classmethod
    def from_peft_type(cls, **kwargs):
        """Build a config read from disk (``from_pretrained``, ``PeftModel.load_adapter``).

        A ``mask_source`` path in a saved config is never opened: loading takes the masks from the adapter
        weights (``mask_source="adapter"``), and the path is kept as ``mask_origin``.
        """
        source = kwargs.get("mask_source")
        if isinstance(source, str) and source not in BUILTIN_SOURCES:
            kwargs["mask_origin"] = kwargs.get("mask_origin") or source
            kwargs["mask_source"] = "adapter"
        config = super().from_peft_type(**kwargs)
        mark_loaded_config(config)
        return config
