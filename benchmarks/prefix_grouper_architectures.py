"""Which causal LMs Prefix Grouper runs exactly: every ``AutoModelForCausalLM`` type, stock vs grouped trainer.

For each model type of the installed transformers (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), a tiny config (2 layers,
hidden 64, 4 attention heads, 2 KV heads, vocabulary 128 where the config has these fields) is built in fp32 with
``sdpa`` (``eager`` where the model has no ``sdpa``), its weights are re-drawn at unit scale (all-zero parameters
too, as training would move them), and two trainers get identical copies: the stock ``trl.GRPOTrainer`` and
``PrefixGrouperGRPOTrainer``. Both score one left-padded batch of two prompts x 4 completions of different lengths
through ``_get_per_token_logps_and_entropies``, whole and with ``batch_size=2`` (how TRL scores old and reference
log-probs). Then a few variants of default configs (ALiBi, length-dependent RoPE past its threshold, sliding
windows shorter than the batch; see ``VARIANTS``). Each type ends as one of:

- ``exact``: grouped log-probs within 1e-5 x max |log-prob| of stock, whole and chunked (the max difference is shown);
- ``refused``: the grouped trainer refused the model when it was built (its message is shown);
- ``not buildable``: no tiny model could be built from the config (the reason is shown);
- ``wrong`` or ``crash``: a silently different result or an unexpected exception, which are bugs.

Usage:
    python benchmarks/prefix_grouper_architectures.py                      # all types, writes the results file
    python benchmarks/prefix_grouper_architectures.py --types opt llama doge --output /tmp/some.txt

The README's support table is rendered from the results file by ``benchmarks/readme_tables.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import re
import tempfile
import time
import warnings
from pathlib import Path

import torch
from harness import RESULTS, add_common_flags, apply_common_flags, write_results
from readme_tables import ARCHITECTURE_VERDICTS, architecture_rows, architecture_summary

RESULTS_FILE = RESULTS / "prefix_grouper_architectures.txt"
SEED = 0  # the base seed of every model's weights and inputs; --seed sets it
VERDICTS = ARCHITECTURE_VERDICTS
RTOL = 1e-5
MAX_PARAMETERS = 30_000_000  # a tiny config above this was not shrunk: not built

# Tiny sizes, set only where the config has the field (aliases cover the older naming schemes)
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "head_dim": 16,
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_inner": 128,
    "n_positions": 256,
    "d_model": 64,
    "num_layers": 2,
    "num_heads": 4,
    "ffn_dim": 128,
    "d_ff": 128,
    "decoder_layers": 2,
    "decoder_attention_heads": 4,
    "decoder_ffn_dim": 128,
    "num_decoder_layers": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "router_aux_loss_coef": 0.0,
    "attention_dropout": 0.0,
    "hidden_dropout": 0.0,
    "dropout": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "hidden_dropout_prob": 0.0,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "rotary_dim": 8,
    "embedding_size": 64,
    "input_embedding_size": 64,
    "output_embedding_size": 64,
}


# Config fields a type needs beyond the tiny sizes to build at 2 layers
OVERRIDES = {"gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": 256}}


_HALF = 8  # rotary frequencies of a 16-dim head
# Configurations beyond the defaults that change what the grouped forward must reproduce, checked as extra rows
VARIANTS = {
    "falcon (alibi=True)": ("falcon", {"alibi": True}),
    "bloom (ALiBi)": ("bloom", {}),
    "llama (rope_type=dynamic, past its threshold)": (
        "llama",
        {"max_position_embeddings": 8, "rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4}},
    ),
    "phi3 (rope_type=longrope, past its threshold)": (
        "phi3",
        {
            "original_max_position_embeddings": 8,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 1e4,
                "original_max_position_embeddings": 8,
                "short_factor": [1.0 + i for i in range(_HALF)],
                "long_factor": [2.0 + i for i in range(_HALF)],
            },
        },
    ),
    "mistral (sliding_window=4)": ("mistral", {"sliding_window": 4}),
    "phi3 (sliding_window=4)": ("phi3", {"sliding_window": 4}),
    "starcoder2 (sliding_window=4)": ("starcoder2", {"sliding_window": 4}),
    "qwen2 (use_sliding_window=True, max_window_layers=1)": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    ),
    "qwen2 (use_sliding_window=True, no sliding layer)": ("qwen2", {"use_sliding_window": True, "sliding_window": 4}),
    "phimoe (sliding_window=4, applied by the mask only)": ("phimoe", {"sliding_window": 4}),
}


def tiny_config(model_type: str):
    """The config of ``model_type`` (or a :data:`VARIANTS` name) with the :data:`TINY` sizes it has fields for (the
    text config's, for composite configs)."""
    from transformers import AutoConfig

    model_type, extra = VARIANTS.get(model_type, (model_type, {}))
    default = AutoConfig.for_model(model_type)
    text = default.get_text_config()
    sizes = {key: value for key, value in TINY.items() if hasattr(text, key) and _settable(text, key)}
    if "qk_rope_head_dim" in sizes:  # MLA: the rotary head dim is qk_rope_head_dim, keys have every head
        sizes.pop("head_dim", None)
        sizes.pop("num_key_value_heads", None)
    sizes.update(OVERRIDES.get(model_type, {}))
    sizes.update(extra)
    try:
        config = _with_sizes(model_type, default, text, sizes)
    except Exception:  # noqa: BLE001 -- retried below with the per-layer lists cut to the new depth
        # Per-layer lists (layer types, sparsity patterns ...) of the default depth: keep the first layers' entries
        depth = getattr(text, "num_hidden_layers", None)
        layers = sizes.get("num_hidden_layers", sizes.get("n_layer", sizes.get("num_layers")))
        if not (isinstance(depth, int) and layers):
            raise
        for key, value in text.to_dict().items():
            if isinstance(value, list) and len(value) == depth and key not in sizes:
                sizes[key] = value[:layers]
        config = _with_sizes(model_type, default, text, sizes)
    text = config.get_text_config()
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value >= text.vocab_size:
            setattr(text, name, 0)
    return config


def _with_sizes(model_type: str, default, text, sizes: dict):
    from transformers import AutoConfig

    if text is default:
        return AutoConfig.for_model(model_type, **sizes)
    text_kwargs = {**text.to_dict(), **sizes}
    text_kwargs.pop("layer_types", None)
    key = next(name for name, value in vars(default).items() if value is text)
    return AutoConfig.for_model(model_type, **{key: text_kwargs})


def _settable(config, key: str) -> bool:
    attribute = getattr(type(config), config.attribute_map.get(key, key), None)
    return not isinstance(attribute, property) or attribute.fset is not None


def sharpen_(model, seed: int = 0):
    """Re-draw the weights at unit scale so that log-probs are far from uniform and every mechanism shows.

    Matrices: N(0, 1) for embeddings, N(0, 1.5^2 / fan_in) otherwise; biases get N(0, 0.1^2) added; all-zero
    vectors (zero-initialised gates, Doge's dynamic-mask ``A``) are drawn from N(0, 0.5^2).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.is_floating_point():
                continue
            noise = torch.randn(param.shape, generator=gen)
            if param.dim() >= 2:
                embedding = "embed" in name or "wte" in name or "wpe" in name
                fan_in = param.size(-1) if embedding else min(param.shape[-2:])
                param.copy_(noise * (1.0 if embedding else 1.5 / fan_in**0.5))
            elif not param.any():
                param.copy_(noise * 0.5)
            elif "bias" in name:
                param.add_(noise * 0.1)
    return model


def build(model_type: str):
    """A tiny fp32 model of ``model_type`` with sharpened weights, and the attention implementation it uses."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    count = sum(p.numel() for p in meta.parameters())
    if count > MAX_PARAMETERS:
        return None, meta, f"the tiny config still has {count / 1e6:.0f}M parameters"
    last_error = None
    for attn in ("sdpa", "eager"):
        try:
            torch.manual_seed(SEED)
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
        except (ValueError, ImportError, NotImplementedError) as error:
            last_error = error
            continue
        return sharpen_(model, SEED), attn, None
    return None, None, _short(last_error)


def make_batch(vocab_size: int, pad_token_id: int):
    """Two left-padded prompts (3 and 7 tokens) x 4 completions of 1 to 6 tokens, right-padded, groups interleaved."""
    gen = torch.Generator().manual_seed(SEED)
    high = min(vocab_size, 100)
    prompts = [torch.randint(10, high, (n,), generator=gen).tolist() for n in (3, 7)]
    width_c = 6
    ids, mask = [], []
    for row in range(8):
        prompt = prompts[row % 2]
        length = 1 + (row * 5) % width_c
        completion = torch.randint(10, high, (length,), generator=gen).tolist()
        pad_p, pad_c = 7 - len(prompt), width_c - length
        ids.append([pad_token_id] * pad_p + prompt + completion + [pad_token_id] * pad_c)
        mask.append([0] * pad_p + [1] * (len(prompt) + length) + [0] * pad_c)
    return torch.tensor(ids), torch.tensor(mask), width_c


def trainer_for(model, grouped: bool, output_dir: str):
    from trl import GRPOConfig, GRPOTrainer

    from peft_trl_testbed import arithmetic_reward, build_toy_tokenizer, make_arithmetic_dataset, toy_args
    from trl_ext import PrefixGrouperGRPOConfig, PrefixGrouperGRPOTrainer

    config_cls, trainer_cls = (
        (PrefixGrouperGRPOConfig, PrefixGrouperGRPOTrainer) if grouped else (GRPOConfig, GRPOTrainer)
    )
    args = toy_args(
        config_cls,
        output_dir,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        disable_dropout=True,
        beta=0.0,
        bf16=False,
    )
    return trainer_cls(
        model=model,
        reward_funcs=arithmetic_reward,
        args=args,
        train_dataset=make_arithmetic_dataset(8),
        processing_class=build_toy_tokenizer(),
    )


def relative_error(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(max |actual - expected|, max |expected|) over ``mask``."""
    a, e = actual.detach().double()[mask], expected.detach().double()[mask]
    if not torch.isfinite(e).all():
        return float("nan"), float("nan")
    return float((a - e).abs().nan_to_num(nan=float("inf")).max()), float(e.abs().max())


def _short(error) -> str:
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
    return re.sub(r"\s+", " ", text).strip()[:400]


def check_type(model_type: str) -> tuple[str, str]:
    """(verdict, detail) for one model type."""
    from trl_ext.prefix_grouper import install_grouped_attention

    try:
        model, attn, why_not = build(model_type)
    except Exception as error:  # noqa: BLE001 -- anything a config cannot build is reported as such
        return "not buildable", _short(error)
    if model is None:
        meta = attn
        if meta is not None:  # too large to build: the installer may still refuse it on the meta device
            try:
                install_grouped_attention(meta)
            except ValueError as error:
                return "refused", _short(str(error)) + f" (checked on the meta device: {why_not})"
        return "not buildable", why_not
    with tempfile.TemporaryDirectory() as tmp:
        try:
            stock = trainer_for(copy.deepcopy(model), False, tmp + "/stock")
        except Exception as error:  # noqa: BLE001
            return "not buildable", "the stock GRPOTrainer cannot be built: " + _short(error)
        text = stock.model.config.get_text_config()
        input_ids, attention_mask, logits_to_keep = make_batch(text.vocab_size, 0)
        scored = attention_mask[:, -logits_to_keep:].bool()
        expected = {}
        for batch_size in (None, 2):
            with torch.no_grad():
                try:
                    expected[batch_size] = stock._get_per_token_logps_and_entropies(
                        stock.model.eval(), input_ids, attention_mask, logits_to_keep, batch_size=batch_size
                    )[0]
                except Exception as error:  # noqa: BLE001
                    return "not buildable", "the stock forward fails on the batch: " + _short(error)
        try:
            grouped = trainer_for(model, True, tmp + "/grouped")
        except ValueError as error:
            if "Prefix grouping cannot run" in str(error):
                return "refused", _short(str(error))
            return "crash", "construction: " + _short(error)
        except Exception as error:  # noqa: BLE001
            return "crash", "construction: " + _short(error)
        worst, scale = 0.0, 0.0
        for batch_size in (None, 2):
            with torch.no_grad():
                try:
                    actual = grouped._get_per_token_logps_and_entropies(
                        grouped.model.eval(), input_ids, attention_mask, logits_to_keep, batch_size=batch_size
                    )[0]
                except Exception as error:  # noqa: BLE001
                    return "crash", f"scoring (batch_size={batch_size}): " + _short(error)
            diff, size = relative_error(actual, expected[batch_size], scored)
            if diff != diff:
                return "not buildable", "the stock forward gives non-finite log-probs"
            worst, scale = max(worst, diff), max(scale, size)
    detail = f"max diff {worst:.2e} (max |log-prob| {scale:.1f}, {attn})"
    return ("exact" if worst <= RTOL * scale + 1e-10 else "wrong"), detail


@contextlib.contextmanager
def quiet():
    """Silence the libraries' warnings and logs while a model type is checked."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)
            hf_logging.set_verbosity(level)


def all_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) + list(VARIANTS)


def parse_results(path: Path) -> list[tuple[str, str, str]]:
    """``(model_type, verdict, detail)`` rows of a results file."""
    return architecture_rows(Path(path))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--types",
        nargs="+",
        help="model types (or variant names) to check (default: every AutoModelForCausalLM type, then the variants)",
    )
    add_common_flags(parser, RESULTS_FILE)
    cli = parser.parse_args()
    output = cli.output
    apply_common_flags(cli)
    global SEED
    SEED = cli.seed
    types = cli.types or all_types()
    lines = ["| model type | verdict | detail |", "|---|---|---|"]
    rows = []
    for model_type in types:
        start = time.perf_counter()
        with quiet():
            try:
                verdict, detail = check_type(model_type)
            except Exception as error:  # noqa: BLE001 -- an unexpected failure of the sweep itself
                verdict, detail = "crash", "sweep: " + _short(error)
        detail = detail.replace("|", "/")
        rows.append((model_type, verdict, detail))
        lines.append(f"| {model_type} | {verdict} | {detail} |")
        print(f"{model_type:28s} {verdict:14s} {time.perf_counter() - start:5.1f}s  {detail[:150]}", flush=True)
    lines.insert(0, architecture_summary(rows) + "\n")
    path = write_results(output, "\n".join(lines))
    print(architecture_summary(rows))
    print(f"saved to {path}")


if __name__ == "__main__":
    main()
