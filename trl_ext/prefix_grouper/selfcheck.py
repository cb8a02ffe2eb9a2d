"""The construction-time self-check: grouped log-probs against the model's own stock forward, on a tiny batch.

The packed row reproduces the stock forward only for models that compute every token from its id, its position id
and attention over the keys the layout allows. A model that numbers positions itself (from the row's width, like the
BART-family decoders), carries a bias in its attention mask (ALiBi, Doge's dynamic mask) or does anything else the
layout does not model would train on silently wrong log-probs. So, when the trainer is built, the policy and the
reference model score a synthetic batch both ways: two prompts of different lengths (left-padded), completions of
different lengths (right-padded), scored whole and in chunks that split a group (as TRL's ``batch_size`` does), with
the model's own weights and compute dtype. A difference beyond :func:`tolerance` refuses the model (in bf16 and fp16
the bound is at least 4x the stock forward's own change when the rows are scored one at a time).

Two position conventions are tried, in order: positions counting the prompt's left padding (models that number
positions by column, e.g. Llama's ``arange``) and positions from the first real token (models that derive them from
the attention mask, e.g. OPT's ``cumsum``). The first that reproduces the stock forward is used for training.

All-zero parameters (zero-initialised biases, Doge's ``A``, a fresh LoRA ``B``) can hide a mismatch that training
would reveal, so they are set to random values during the check and zeroed again after it, exactly.

Example:
    ```py
    >>> from trl_ext.prefix_grouper.selfcheck import selfcheck_batch
    >>> input_ids, attention_mask, logits_to_keep = selfcheck_batch(vocab_size=100)
    >>> attention_mask.tolist()[:2]
    [[0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]]
    ```
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from peft_ext._quantized import keep_4bit_training_layout, quantized_compute_dtypes

from .._compat import zero3_full_shape, zero3_partitioned
from .attention import FALLBACK_HINT

# count_padding of :func:`~trl_ext.prefix_grouper.layout.pack_groups` for each position convention, in trial order
POSITION_CONVENTIONS = {"columns": True, "mask": False}
# Relative tolerance on the log-probs per compute dtype: a few hundred ulps of the dtype, scaled by the largest
# |log-prob| (kernels and reduction orders differ between the two forwards, and errors grow with depth)
RTOL = {torch.float64: 1e-7, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}
NOISE_FACTOR = 4
PROMPT_LENGTHS = (3, 7)
COMPLETION_LENGTHS = (4, 1, 2, 4)  # rows a, b, a, b: groups interleaved, one completion of each group shorter
CHUNK_ROWS = 3  # scored in chunks of 3 rows too: the first chunk splits group b, the second holds one row


@dataclass
class AttentionCalls:
    """What the grouped attention functions received during a forward (see :func:`attention_calls_seen`).

    Attributes:
        sliding_windows (`set[int]`): every ``sliding_window`` argument.
        mask_changed (`bool`): a grouped call got an attention mask other than the integer segment ids the packed
            forward passes, i.e. the model added something to the mask (ALiBi, a dynamic mask) that the split
            attention does not apply.
    """

    sliding_windows: set[int]
    mask_changed: bool = False


@contextlib.contextmanager
def attention_calls_seen():
    """Record, inside the block, what every grouped attention call receives (an :class:`AttentionCalls`)."""
    from transformers import AttentionInterface

    from .attention import GROUPED_IMPLEMENTATIONS, LAYOUT_KWARG, register_grouped_attention

    register_grouped_attention()
    seen = AttentionCalls(set())
    registry = AttentionInterface()
    originals = {name: registry[name] for name in GROUPED_IMPLEMENTATIONS.values()}

    def spy(function):
        def attention(module, query, key, value, attention_mask, *args, **kwargs):
            if kwargs.get("sliding_window") is not None:
                seen.sliding_windows.add(int(kwargs["sliding_window"]))
            if kwargs.get(LAYOUT_KWARG) is not None and isinstance(attention_mask, torch.Tensor):
                seen.mask_changed |= attention_mask.dtype != torch.long
            return function(module, query, key, value, attention_mask, *args, **kwargs)

        return attention

    for name, function in originals.items():
        AttentionInterface.register(name, spy(function))
    try:
        yield seen
    finally:
        for name, function in originals.items():
            AttentionInterface.register(name, function)


@dataclass
class SelfCheckResult:
    """What the self-check measured.

    Attributes:
        position_convention (`str`): the convention that reproduced the stock forward (a key of
            ``POSITION_CONVENTIONS``).
        max_diff (`float`): largest |grouped - stock| log-prob over the scored tokens, whole and chunked.
        tolerance (`float`): the bound it was held to.
        perturbed (`list[str]`): all-zero parameters that were set to random values during the check.
        sliding_windows (`set[int]`): the ``sliding_window`` values the attention layers passed to the grouped
            attention (windows implemented through that argument; see :func:`check_sliding_window`).
    """

    position_convention: str
    max_diff: float
    tolerance: float
    perturbed: list[str]
    sliding_windows: set[int]


def selfcheck_batch(vocab_size: int, device: torch.device | str = "cpu"):
    """The synthetic batch: ``(input_ids, attention_mask, logits_to_keep)`` as TRL passes them to the log-prob hook.

    Two prompts of 3 and 7 tokens, left-padded to 7, each with two completions (rows ``a, b, a, b``) of 4, 1, 2 and
    4 tokens, right-padded to 4. Token ids are drawn from a fixed generator below ``vocab_size``.
    """
    gen = torch.Generator().manual_seed(1234)
    low = min(4, vocab_size - 1)  # avoid the lowest ids, often special tokens
    width_p, width_c = max(PROMPT_LENGTHS), max(COMPLETION_LENGTHS)
    prompts = [torch.randint(low, vocab_size, (n,), generator=gen) for n in PROMPT_LENGTHS]
    input_ids = torch.zeros(len(COMPLETION_LENGTHS), width_p + width_c, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(COMPLETION_LENGTHS):
        prompt = prompts[row % 2]
        input_ids[row, width_p - len(prompt) : width_p] = prompt
        input_ids[row, width_p : width_p + length] = torch.randint(low, vocab_size, (length,), generator=gen)
        attention_mask[row, width_p - len(prompt) : width_p + length] = 1
    input_ids = input_ids.masked_fill(attention_mask == 0, low)
    return input_ids.to(device), attention_mask.to(device), width_c


def tolerance(dtype: torch.dtype, stock_logps: torch.Tensor) -> float:
    """The largest grouped-vs-stock log-prob difference accepted in ``dtype``: ``RTOL[dtype] * max(1, max |logp|)``."""
    rtol = RTOL.get(dtype, RTOL[torch.bfloat16])
    finite = stock_logps[torch.isfinite(stock_logps)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    return rtol * scale


def max_diff(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest |actual - expected| over ``mask``; a non-finite value on one side only counts as infinite."""
    actual, expected = actual.detach().double()[mask], expected.detach().double()[mask]
    both_nan = torch.isnan(actual) & torch.isnan(expected)
    diff = (actual - expected).abs().masked_fill(both_nan | (actual == expected), 0.0)
    return float(diff.nan_to_num(nan=float("inf")).max()) if diff.numel() else 0.0


def weights_materialised(model: torch.nn.Module) -> bool:
    """False while weights are on the meta device or partitioned (DeepSpeed ZeRO-3 leaves empty local shards)."""
    params = list(model.parameters())
    return bool(params) and not any(p.device.type == "meta" or p.numel() == 0 or zero3_partitioned(p) for p in params)


def compute_dtype(model, mixed_precision: torch.dtype | None = None) -> torch.dtype:
    """The least precise dtype the forward computes in: the autocast dtype, the embeddings' dtype, a PEFT adapter's
    dtype (PEFT casts a layer's input to it, so a bf16 adapter computes its share in bf16), and what quantised layers
    compute in (see :func:`peft_ext._quantized.quantized_compute_dtypes`). The dtypes other weights are stored in do
    not count: type promotion keeps an fp32 forward in fp32 through, say, an fp16 norm weight."""
    candidates = {torch.float32 if mixed_precision is None else mixed_precision}
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        candidates.add(weight.dtype)
    if isinstance(getattr(model, "peft_config", None), dict):
        candidates |= {p.dtype for p in model.parameters() if p.requires_grad and p.is_floating_point()}
    candidates |= quantized_compute_dtypes(model)
    return max(candidates, key=lambda dtype: torch.finfo(dtype).eps)


def output_vocab_size(model: torch.nn.Module) -> int:
    """Rows of the model's output embeddings (the full shape under ZeRO-3), else the config's ``vocab_size``."""
    weight = getattr(model.get_output_embeddings(), "weight", None)
    # A ZeRO-3 partition holds no rows here; DeepSpeed keeps the full shape in ds_shape
    shape = zero3_full_shape(weight) or (weight.shape if weight is not None else None)
    return shape[0] if shape else model.config.get_text_config().vocab_size


@contextlib.contextmanager
def probing(model: torch.nn.Module):
    """Eval mode (no dropout) and no gradients inside the block; every module's own mode is restored after it.

    The probe leaves the model as it was: bitsandbytes would otherwise repack 4-bit weights (lossily, and for a
    kernel that training gets no gradient through) on this eval forward; see :func:`keep_4bit_training_layout`.
    """
    keep_4bit_training_layout(model)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes.items():
            module.training = mode


@contextlib.contextmanager
def zero_parameters_perturbed(model: torch.nn.Module, seed: int = 0, std: float = 1.0):
    """Give every all-zero floating-point parameter random values inside the block, and zero it again after it.

    Yields the names of the perturbed parameters. Zeroing restores them exactly. Tensor subclasses (quantised
    weights such as torchao's) are left alone: they are never all zero, and support few operations.
    """
    gen = torch.Generator().manual_seed(seed)
    perturbed = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            plain = type(param.data) is torch.Tensor
            if plain and param.is_floating_point() and param.numel() and not param.any():
                noise = torch.randn(param.shape, generator=gen) * std
                param.copy_(noise.to(device=param.device, dtype=param.dtype))
                perturbed.append((name, param))
    try:
        yield [name for name, _ in perturbed]
    finally:
        with torch.no_grad():
            for _, param in perturbed:
                param.zero_()


def ignores_position_ids(model: torch.nn.Module, input_ids: torch.Tensor) -> bool:
    """Whether the model's logits stay the same when its explicit ``position_ids`` are shifted by 2."""
    row = input_ids[:1]
    positions = torch.arange(row.size(1), device=row.device)[None]
    try:
        first = model(input_ids=row, position_ids=positions).logits
        second = model(input_ids=row, position_ids=positions + 2).logits
    except Exception:  # noqa: BLE001 -- a diagnosis only: no verdict when the probe cannot run
        return False
    return bool(torch.equal(first, second))


def _model_type(model: torch.nn.Module) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "config", None), "model_type", type(base).__name__)


def _refusal(model: torch.nn.Module, what: str) -> ValueError:
    return ValueError(
        f"Prefix grouping cannot run model_type={_model_type(model)!r}: {what} Instead, {FALLBACK_HINT}."
    )


Scorer = Callable[..., torch.Tensor]


def _measure(score: Scorer, model, batch, stock: torch.Tensor, mask: torch.Tensor, count_padding: bool) -> float:
    input_ids, attention_mask, logits_to_keep = batch
    diffs = []
    for batch_size in (None, CHUNK_ROWS):
        grouped = score(model, input_ids, attention_mask, logits_to_keep, batch_size, count_padding)
        diffs.append(max_diff(grouped, stock, mask))
    return max(diffs)


def self_check(
    score: Scorer, model: torch.nn.Module, vocab_size: int, dtype: torch.dtype, conventions: list[str] | None = None
) -> SelfCheckResult:
    """Score the synthetic batch the stock way and the grouped way; return the first position convention that agrees.

    Args:
        score (`Callable`): ``score(model, input_ids, attention_mask, logits_to_keep, batch_size, count_padding)``
            returns the ``(B, logits_to_keep)`` per-token log-probs; ``count_padding=None`` asks for the stock
            forward, ``True``/``False`` for the grouped one with that position convention.
        model: the model to check (its weights and dtype are used as they are).
        vocab_size (`int`): ids of the synthetic batch are drawn below it.
        dtype (`torch.dtype`): the compute dtype (the autocast dtype under mixed precision), which sets the tolerance.
        conventions (`list[str]`, *optional*): the position conventions to try (default: all, in order).

    Raises:
        ValueError: naming the model type, the measured difference, the likely cause and the stock-trainer fallback.
    """
    conventions = list(POSITION_CONVENTIONS) if conventions is None else conventions
    device = next(model.parameters()).device
    batch = selfcheck_batch(vocab_size, device)
    mask = batch[1][:, -batch[2] :].bool()
    with probing(model), zero_parameters_perturbed(model) as perturbed, attention_calls_seen() as calls:
        try:
            stock = score(model, *batch, None, None)
        except Exception as error:  # noqa: BLE001 -- reported, with the fallback
            raise _refusal(model, f"its stock forward failed on the self-check batch ({_describe(error)}).") from error
        if not torch.isfinite(stock[mask]).all():
            raise _refusal(model, "its stock forward gives non-finite log-probs on the self-check batch.")
        tol = tolerance(dtype, stock[mask])
        if dtype not in (torch.float32, torch.float64):
            # Low precision: the stock forward itself moves with the batch composition (kernels tile differently);
            # never hold the grouped forward to less than a few times that
            rows = score(model, *batch, 1, None)
            tol = max(tol, NOISE_FACTOR * max_diff(rows, stock, mask))
        measured: dict[str, float] = {}
        failure = None
        for name in conventions:
            try:
                measured[name] = _measure(score, model, batch, stock, mask, POSITION_CONVENTIONS[name])
            except ValueError as error:
                if str(error).startswith("Prefix grouping cannot run"):
                    raise  # a refusal of the grouped path itself, already explained
                failure = error
                break
            except Exception as error:  # noqa: BLE001 -- a crash of the packed forward is a refusal, not a crash
                failure = error
                break
            if measured[name] <= tol:
                return SelfCheckResult(name, measured[name], tol, perturbed, calls.sliding_windows)
        if failure is not None:
            why = f"its forward fails on the packed rows of the self-check batch ({_describe(failure)})."
            if calls.mask_changed:
                why += " " + MASK_CHANGED
            raise _refusal(model, why) from failure
        diff = min(measured.values())
        why = MASK_CHANGED if calls.mask_changed else _diagnose(score, model, batch, stock, mask, tol, perturbed)
    raise _refusal(
        model,
        f"on a self-check batch (two left-padded prompts, completions of different lengths, scored whole and in "
        f"chunks of {CHUNK_ROWS} rows) its grouped log-probs differ from its own stock forward by up to {diff:.3g} "
        f"(tolerance {tol:.2g} in {str(dtype).removeprefix('torch.')}). {why}",
    )


MASK_CHANGED = (
    "Its attention layers add to the attention mask (a bias carried in the mask, such as ALiBi or a dynamic mask), "
    "which the split attention does not apply."
)


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".strip()[:300]


def _diagnose(score, model, batch, stock, mask, tol, perturbed: list[str]) -> str:
    """The likely cause of a mismatch, in words (called with the zero parameters perturbed)."""
    if ignores_position_ids(model, batch[0]):
        return (
            "Its output does not change with position_ids: it numbers positions itself (from the row's width or "
            "mask), so the packed row cannot give it the positions of the stock forward."
        )
    if perturbed:
        # Was the model exact with its all-zero parameters left at zero?
        zeroed = {name: p for name, p in model.named_parameters() if name in set(perturbed)}
        saved = {name: p.detach().clone() for name, p in zeroed.items()}
        for p in zeroed.values():
            p.zero_()
        try:
            stock_zero = score(model, *batch, None, None)
            exact_at_zero = any(
                _measure(score, model, batch, stock_zero, mask, count_padding) <= tol
                for count_padding in POSITION_CONVENTIONS.values()
            )
        except Exception:  # noqa: BLE001 -- a diagnosis only
            exact_at_zero = False
        finally:
            for name, p in zeroed.items():
                p.copy_(saved[name])
        if exact_at_zero:
            shown = ", ".join(perturbed[:3]) + (", ..." if len(perturbed) > 3 else "")
            return (
                f"The difference appears once its all-zero parameters ({shown}) move away from zero, as training "
                "moves them: they drive a computation the packed row does not reproduce (for example a bias carried "
                "in the attention mask)."
            )
    return (
        "The packed row does not reproduce something its forward computes: positions derived from the mask or the "
        "row's width, a bias carried in the attention mask (ALiBi, dynamic masks), or a computation that depends on "
        "the sequence length."
    )


# Config fields of randomness some models apply in training mode without an ``nn.Dropout`` module (which TRL's
# ``disable_dropout`` would switch off); named in the refusal when set
RANDOM_CONFIG_FIELDS = (
    "attention_dropout",
    "attn_pdrop",
    "dropout",
    "activation_dropout",
    "hidden_dropout",
    "layerdrop",
    "router_jitter_noise",
)


def check_training_determinism(model: torch.nn.Module, vocab_size: int) -> None:
    """Refuse a model whose forward is random in training mode (dropout left on, functional dropout that TRL's
    ``disable_dropout`` does not reach, MoE router jitter, layer drop).

    A packed row encodes the prompt once, so its completions share one dropout mask on the prompt where the stock
    rows draw one each: the loss then follows another distribution, not just other random draws. The check runs the
    model twice in training mode on the self-check batch with two seeds (the global random state is restored) and
    refuses when the outputs differ, naming the config fields that are set.

    Raises:
        ValueError: naming the model type, the random fields and the fallback.
    """
    input_ids, attention_mask, _ = selfcheck_batch(vocab_size, next(model.parameters()).device)
    modes = {module: module.training for module in model.modules()}
    model.train()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            outputs = []
            for seed in (0, 1):
                torch.manual_seed(seed)
                outputs.append(model(input_ids=input_ids, attention_mask=attention_mask).logits)
    finally:
        for module, mode in modes.items():
            module.training = mode
    if torch.equal(outputs[0], outputs[1]):
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config()
    fields = [f"{n}={getattr(config, n)}" for n in RANDOM_CONFIG_FIELDS if getattr(config, n, None) not in (None, 0)]
    raise _refusal(
        model,
        "its forward is random in training mode ("
        + (", ".join(fields) if fields else "dropout modules with p > 0")
        + "), and a packed row would draw one random mask for a prompt its completions share, where the stock "
        "forward draws one per completion; the loss would follow another distribution. Set those to 0 in the model "
        "config (and disable_dropout=True in the trainer config).",
    )


def longest_sequence(args, config) -> tuple[int | None, str]:
    """The longest prompt + completion a run can score, and what bounds it.

    TRL's ``max_prompt_length`` plus ``max_completion_length`` where the config has both, else DPO's ``max_length``,
    else ``vllm_max_model_length``, else the model's ``max_position_embeddings``.
    """
    completion = getattr(args, "max_completion_length", None)
    prompt = getattr(args, "max_prompt_length", None)
    if prompt is not None and completion is not None:
        return prompt + completion, f"max_prompt_length + max_completion_length = {prompt} + {completion}"
    if getattr(args, "max_length", None):  # DPO's bound on prompt + completion
        return args.max_length, f"max_length={args.max_length}"
    if getattr(args, "vllm_max_model_length", None):
        return args.vllm_max_model_length, f"vllm_max_model_length={args.vllm_max_model_length}"
    limit = getattr(config, "max_position_embeddings", None)
    if limit:
        return limit, f"the model's max_position_embeddings={limit}"
    return None, "nothing in the config bounds it"


def config_window_applies(config) -> bool:
    """Whether the config's ``sliding_window`` is applied by some layer: with ``layer_types``, only when one of them
    is a sliding type (those decide, e.g. Qwen2's ``max_window_layers``); without, unless
    ``use_sliding_window=False`` (Mistral, Phi-3, StarCoder2 and PhiMoE apply it to every layer, PhiMoE through the
    attention mask only)."""
    if not getattr(config, "sliding_window", None) or getattr(config, "use_sliding_window", True) is False:
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return any("sliding" in str(layer_type) for layer_type in layer_types)
    return True


def check_sliding_window(model: torch.nn.Module, args, seen: tuple[int, ...] | set[int] = ()) -> None:
    """Refuse, when the trainer is built, a sliding window that the run's sequences can outgrow and the split
    attention does not apply; it would otherwise be ignored, or stop the run at the first longer batch.

    The windows the attention layers pass as the ``sliding_window`` argument (``seen`` during the self-check) are
    applied exactly by the split attention. What counts is a config ``sliding_window`` that applies
    (:func:`config_window_applies`) but never reaches the attention function, because the model applies it through
    the attention mask only, which the split attention does not read.

    Raises:
        ValueError: naming the model type, the window, the bound on the sequences and the fallback.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config()
    windows = {}
    if config_window_applies(config) and config.sliding_window not in seen:
        windows[config.sliding_window] = "the model applies it through the attention mask only, which the split "
        windows[config.sliding_window] += "attention does not read"
    if not windows:
        return
    window = min(windows)
    longest, source = longest_sequence(args, config)
    knob = "max_length" if hasattr(args, "max_length") else "vllm_max_model_length"
    if longest is not None and longest <= window:
        return
    raise _refusal(
        model,
        f"sliding_window={window} is shorter than the sequences this run can score (up to {longest} tokens: "
        f"{source}), and {windows[window]}. Bound the sequences to the window ({knob}<={window}), or "
        "use a model without a sliding window.",
    )
