"""Configuration of the MoRA tuner type."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils import PeftType

from .._loading import mark_loaded_config
from .ops import MORA_TYPE_ALIASES, MORA_TYPES, resolve_mora_type


@dataclass
class MoraConfig(PeftConfig):
    """Configuration of a [`MoraModel`]: high-rank updating with one square matrix per layer.

    MoRA (Jiang et al., 2024) trains one square matrix M (r_hat x r_hat) per target layer,
    initialised to zero, and maps it into the layer with parameter-free compression and
    decompression operators (see [`peft_ext.mora.ops`]). ``r`` is the LoRA rank whose
    parameter budget MoRA matches: ``r_hat = floor(sqrt((d_in + d_out) * r))``, so MoRA never
    has more trainable parameters than LoRA of the same ``r``. There is no alpha (scaling 1).

    Args:
        r (`int`, defaults to 8): LoRA-equivalent rank; sets r_hat per layer as above.
        mora_type (`str` or `int`, defaults to `"rotation"`): compression/decompression operator:
            `"truncation"`, `"sharing"` (reference code 1), `"decoupling"`, `"rotation"` (code 6), or the
            ReMoRA grouping variants `"group_interleave"` (2), `"group_tile"` (3), `"wrap_interleave"` (4).
            Integers are accepted and stored as names. The reference recommends rotation for small
            ranks (r=8) and sharing for large ranks (r=256).
        target_modules (`list[str]` or `str`, *optional*): module names (or a regex) to adapt; `"all-linear"`
            adapts every linear layer except the output head. Defaults per architecture like LoRA's.
        exclude_modules (`list[str]` or `str`, *optional*): module names (or a regex) to leave alone.
        mora_dropout (`float`, defaults to 0.0): dropout on the layer input before compression.
        fan_in_fan_out (`bool`, defaults to `False`): the layer stores its weight as (fan_in, fan_out), like
            GPT-2's `Conv1D`. MoRA detects this per layer and warns when the flag disagrees.
        bias (`str`, defaults to `"none"`): which biases to train: `"none"`, `"all"` or `"mora_only"`.
        init_weights (`bool`, defaults to `True`): zero-initialise M (the adapter starts as a no-op). `False`
            draws M at random, which is only useful for tests.
        layers_to_transform (`list[int]` or `int`, *optional*): only adapt these layer indices.
        layers_pattern (`str` or `list[str]`, *optional*): name of the layer list, used with `layers_to_transform`.
        modules_to_save (`list[str]`, *optional*): extra modules to train fully and save with the adapter.
        exact_unmerge (`bool`, defaults to `False`): keep a copy of each adapted base weight, in its own dtype
            and on its device, while the adapter is merged, so that `unmerge` restores the base weight bit for
            bit. Costs one extra copy of every adapted weight for as long as the adapter stays merged (none
            after `merge_and_unload`, which frees each copy as it unloads the layer). Without it, `unmerge`
            subtracts the update again, which in bf16/fp16 leaves rounding drift in the base weight
            (`benchmarks/results/merge_precision.txt`). Changes made to the base weight while merged are
            discarded by an exact unmerge.

    Example:
        ```py
        >>> from transformers import AutoModelForCausalLM
        >>> from peft import get_peft_model
        >>> from peft_ext import MoraConfig
        >>> model = AutoModelForCausalLM.from_pretrained("path/or/hub-id-of-a-llama-model")
        >>> config = MoraConfig(r=8, mora_type="rotation", target_modules=["q_proj", "v_proj"])
        >>> model = get_peft_model(model, config)
        >>> model.print_trainable_parameters()  # doctest: +SKIP
        ```
    """

    r: int = field(
        default=8,
        metadata={
            "help": (
                "LoRA-equivalent rank. Each target layer gets a square matrix of side r_hat = "
                "floor(sqrt((in_features + out_features) * r)), i.e. at most as many parameters as LoRA of rank r."
            )
        },
    )
    mora_type: str | int = field(
        default="rotation",
        metadata={
            "help": (
                f"Compression/decompression operator, one of {list(MORA_TYPES)} or a reference code "
                f"{MORA_TYPE_ALIASES}. 'rotation' suits small ranks, 'sharing' large ones."
            )
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "Module names or a regex of the modules to adapt, e.g. ['q_proj', 'v_proj']; 'all-linear' adapts every "
                "linear layer except the output head. Only torch.nn.Linear and transformers Conv1D are supported."
            )
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names or a regex of the modules not to adapt."},
    )
    mora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the input before compression."})
    fan_in_fan_out: bool = field(
        default=False,
        metadata={
            "help": "True if the target layers store weights as (fan_in, fan_out), like GPT-2's Conv1D (detected per layer)."
        },
    )
    bias: str = field(default="none", metadata={"help": "Which biases to train: 'none', 'all' or 'mora_only'."})
    init_weights: bool = field(
        default=True,
        metadata={"help": "Zero-initialise M so that the adapter starts as a no-op; False (random M) is for tests."},
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={"help": "Layer indices to adapt; all matching layers when None."},
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={"help": "Name of the layer list (e.g. 'layers' or 'h'), used only with layers_to_transform."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules besides the MoRA layers to train fully and save in the adapter, e.g. ['lm_head']."},
    )
    exact_unmerge: bool = field(
        default=False,
        metadata={
            "help": (
                "Keep a copy of each adapted base weight while merged so that unmerge restores it bit-exactly; "
                "costs one extra copy of every adapted weight while the adapter is merged."
            )
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType["MORA"]
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r={self.r!r} must be a positive integer (the LoRA rank whose budget MoRA matches).")
        self.mora_type = resolve_mora_type(self.mora_type)
        if not 0.0 <= self.mora_dropout < 1.0:
            raise ValueError(f"mora_dropout={self.mora_dropout!r} must be in [0, 1).")
        if not isinstance(self.exact_unmerge, bool):
            raise ValueError(f"exact_unmerge={self.exact_unmerge!r} must be True or False.")
        if self.bias not in ("none", "all", "mora_only"):
            raise ValueError(f"bias={self.bias!r} is not supported; use 'none', 'all' or 'mora_only'.")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                f"layers_to_transform={self.layers_to_transform!r} cannot be combined with the regex "
                f"target_modules={self.target_modules!r}; pass target_modules as a list of names instead."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                f"layers_pattern={self.layers_pattern!r} only has an effect together with layers_to_transform; "
                "set layers_to_transform or drop layers_pattern."
            )

    @classmethod
    def from_peft_type(cls, **kwargs):
        """Build a config read from disk; marks it so that a failed first load removes its adapter again."""
        config = super().from_peft_type(**kwargs)
        mark_loaded_config(config)
        return config
