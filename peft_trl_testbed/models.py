"""Tiny random-initialised causal LMs of three architectures, saved like Hub repos.

Llama and Qwen2 use ``nn.Linear`` projections; GPT-2 uses ``Conv1D``, whose transposed
weight exercises PEFT's ``fan_in_fan_out`` path. Every model is saved with its tokenizer
via ``save_pretrained``, so code that takes a model path loads it unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel, Qwen2Config

from .tokenizer import build_toy_tokenizer

ARCHITECTURES = ("llama", "qwen2", "gpt2")
CACHE_ENV = "PEFT_TRL_EXT_CACHE"


def cache_dir() -> Path:
    """Root folder of the on-disk toy cache (``$PEFT_TRL_EXT_CACHE`` or ``~/.cache/peft_trl_ext``)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(Path.home(), ".cache", "peft_trl_ext")
    return Path(root)


def build_once(path: Path, marker: str, build: Callable[[Path], object]) -> str:
    """``path`` as a string, after ``build(tmp)`` has filled it unless ``path/marker`` already exists.

    The build writes to a temporary sibling that is renamed into place, so concurrent processes
    never see a half-written model; if another process finished first, its copy is kept. A build that did
    not write ``marker`` is discarded with an error instead of being cached.

    Raises:
        RuntimeError: when the build is needed under DeepSpeed ZeRO-3 init (the model would be saved
            partitioned, i.e. empty), or when it did not write ``marker``.
    """
    if (path / marker).exists():
        return str(path)
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise RuntimeError(
            f"{path} is not cached yet, and DeepSpeed ZeRO-3 init is active in this process: a toy model built "
            "now would be saved partitioned (empty). Build it first in a process without ZeRO-3, e.g. call the "
            "same toy_model_path / pretrained_toy_model_path before the distributed launch."
        )
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    build(tmp)
    if not (tmp / marker).exists():
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"building {path.name} wrote no {marker} (in {tmp}); nothing was cached.")
    try:
        tmp.rename(path)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


@dataclass(frozen=True)
class ToyModelSpec:
    """Size of a toy model. ``hidden_size`` must be a multiple of ``num_attention_heads``.

    Example:
        ```py
        >>> spec = ToyModelSpec(arch="qwen2", hidden_size=64, num_hidden_layers=2)
        >>> model = build_toy_model(spec)
        ```
    """

    arch: str = "llama"
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    intermediate_size: int | None = None
    max_position_embeddings: int = 1024
    seed: int = 0

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"Unknown toy architecture arch={self.arch!r}; choose one of {list(ARCHITECTURES)}.")
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} is impossible; it must be a positive integer.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; pick sizes whose ratio is an integer (e.g. 64 and 4)."
            )
        kv = self.kv_heads
        if kv <= 0 or self.num_attention_heads % kv:
            raise ValueError(
                f"num_key_value_heads={kv} must be positive and divide num_attention_heads={self.num_attention_heads}."
            )
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            raise ValueError(f"intermediate_size={self.intermediate_size} is impossible; it must be positive.")
        if self.arch != "gpt2" and (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(
                f"head_dim={self.hidden_size // self.num_attention_heads} must be even for rotary embeddings; "
                "change hidden_size or num_attention_heads."
            )

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    def key(self) -> str:
        """A short stable hash of the spec, used as the cache key."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _transformers_config(spec: ToyModelSpec, tokenizer):
    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    inter = spec.intermediate_size or 4 * spec.hidden_size
    if spec.arch == "gpt2":
        return GPT2Config(
            n_embd=spec.hidden_size,
            n_layer=spec.num_hidden_layers,
            n_head=spec.num_attention_heads,
            n_inner=inter,
            n_positions=spec.max_position_embeddings,
            **common,
        )
    cls = LlamaConfig if spec.arch == "llama" else Qwen2Config
    return cls(
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.kv_heads,
        intermediate_size=inter,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        **common,
    )


def build_toy_model(spec: ToyModelSpec | None = None, **sizes) -> PreTrainedModel:
    """Build a random-initialised toy causal LM (fp32) from a spec or keyword sizes.

    Example:
        ```py
        >>> model = build_toy_model(arch="gpt2", hidden_size=32, num_hidden_layers=1)
        ```
    """
    spec = spec or ToyModelSpec(**sizes)
    config = _transformers_config(spec, build_toy_tokenizer())
    torch.manual_seed(spec.seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def build_toy_moe_model(seed: int = 0) -> PreTrainedModel:
    """A one-layer Qwen3-MoE (4 experts, 2 per token) on the toy tokenizer, with a load-balancing loss.

    For checks that a trainer handles a Mixture-of-Experts model's ``aux_loss`` as the stock trainer does.

    Example:
        ```py
        >>> model = build_toy_moe_model()
        >>> model.config.router_aux_loss_coef
        0.01
        ```
    """
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = build_toy_tokenizer()
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.01,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(config)


def save_toy_model(path: str | os.PathLike, spec: ToyModelSpec | None = None, **sizes) -> Path:
    """Build a toy model and save it with its tokenizer at ``path``, like a Hub repo."""
    spec = spec or ToyModelSpec(**sizes)
    path = Path(path)
    model = build_toy_model(spec)
    tokenizer = build_toy_tokenizer()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def toy_model_path(spec: ToyModelSpec | None = None, **sizes) -> str:
    """Path of a saved random toy model, built once and cached on disk by its spec.

    Example:
        ```py
        >>> from transformers import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_pretrained(toy_model_path(arch="llama"))
        ```
    """
    spec = spec or ToyModelSpec(**sizes)
    path = cache_dir() / "models" / f"{spec.arch}-random-{spec.key()}"
    return build_once(path, "config.json", lambda tmp: save_toy_model(tmp, spec))
