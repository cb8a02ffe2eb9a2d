"""The split attention's sliding windows, attention sinks, soft-capping and MLA head dims against a slow reference.

The reference forms the whole ``(L x L)`` score matrix of every packed row, with the allowed pairs written from the
stock row's positions (prefix token ``j`` at ``j``, block token ``i`` at ``prefix_length + i``), and one softmax per
query over the allowed keys and the sink.
"""

import pytest
import torch
from prefix_grouper_helpers import assert_close, logps_of, loss_and_grads, make_batch, peak_backward_bytes, sharpen_

from trl_ext.prefix_grouper import (
    GroupedAttentionLayout,
    find_groups,
    materialized_split_attention,
    pack_groups,
    split_attention,
)


def reference_attention(q, k, v, packed, scaling, window=None, sinks=None, softcap=None):
    """Slow obvious split attention: explicit masked softmax over the full packed row."""
    n_rows, heads, length, _ = q.shape
    rep = heads // k.size(1)
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = torch.zeros(n_rows, heads, length, v.size(-1), dtype=q.dtype)
    for n in range(n_rows):
        seg = packed.segment_ids[n].tolist()
        prefix_len = int(packed.prefix_lengths[n])
        pos = []
        for col, s in enumerate(seg):
            if s == 0:
                pos.append(col)
            else:  # block (or padding) column: index within its slot after the prefix
                pos.append(prefix_len + (col - packed.prefix_width) % packed.block_width)
        allowed = torch.zeros(length, length, dtype=torch.bool)
        for a in range(length):
            for b in range(length):
                if seg[a] == -1:
                    ok = a == b
                elif seg[b] == -1:
                    ok = False
                elif seg[a] == 0:
                    ok = seg[b] == 0 and b <= a
                else:
                    ok = seg[b] == 0 or (seg[b] == seg[a] and b <= a)
                if ok and window is not None:
                    ok = pos[a] - pos[b] < window
                allowed[a, b] = ok
        scores = (q[n] @ k[n].transpose(-1, -2)) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~allowed, float("-inf"))
        if sinks is not None:
            scores = torch.cat([scores, sinks[:, None, None].expand(-1, length, 1).to(scores.dtype)], -1)
        probs = scores.softmax(-1)[..., :length]
        out[n] = probs @ v[n]
    return out.transpose(1, 2)


def packed_batch(one_token_prompt=False, long=False):
    """Two groups with prompts of different lengths (the prefix area is padded), completions of different lengths;
    ``long`` makes prompts and completions long enough for windows of 3-6 to cut the prefix and the blocks."""
    batch = make_batch(seed=3, rows="aabab", max_completion=9 if long else 5)
    if one_token_prompt:
        batch["prompt_mask"][[0, 1, 3]] = 0
        batch["prompt_mask"][[0, 1, 3], -1] = 1
    groups = find_groups(batch["prompt_ids"], batch["prompt_mask"])
    return pack_groups(
        batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"], groups
    )


def run(kind, q, k, v, layout, **kwargs):
    if kind == "materialized":
        return materialized_split_attention(q, k, v, layout, **kwargs)
    layout.kernel = kind
    return split_attention(q, k, v, layout, **kwargs)


KINDS = ["merged", "lower_right", "materialized"]


def check(kind, packed, heads=4, kv_heads=2, dim=8, v_dim=8, window=None, sinks=False, softcap=None, seed=0):
    layout = GroupedAttentionLayout.from_packed(packed)
    gen = torch.Generator().manual_seed(seed)
    n, length = packed.num_rows, packed.seq_len
    opts = dict(generator=gen, dtype=torch.float64)
    q = torch.randn(n, heads, length, dim, **opts).requires_grad_()
    k = torch.randn(n, kv_heads, length, dim, **opts).requires_grad_()
    v = torch.randn(n, kv_heads, length, v_dim, **opts).requires_grad_()
    s = (torch.randn(heads, **opts) * 2).requires_grad_() if sinks else None
    real = (packed.segment_ids != -1)[:, :, None, None]  # padding queries are never read
    grad_out = torch.randn(n, length, heads, v_dim, **opts) * real
    kw = dict(scaling=0.4, sliding_window=window, sinks=s, softcap=softcap)
    out = run(kind, q, k, v, layout, **kw)
    expected = reference_attention(q, k, v, packed, 0.4, window=window, sinks=s, softcap=softcap)
    assert out.shape == expected.shape
    torch.testing.assert_close(out * real, expected * real, rtol=1e-10, atol=1e-10)
    inputs = (q, k, v) + ((s,) if sinks else ())
    grads = torch.autograd.grad(out, inputs, grad_out)
    for got, want in zip(grads, torch.autograd.grad(expected, inputs, grad_out)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window", [1, 3, 5, 8, 40])
def test_sliding_window_matches_reference(kind, window):
    packed = packed_batch(long=True)
    # the windows cut inside the prefix and inside blocks (blocks 8 wide, prefixes 2 and 6 long)
    assert packed.block_width == 8 and packed.prefix_width == 6
    check(kind, packed, window=window)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window", [None, 4])
def test_attention_sinks_match_reference(kind, window):
    check(kind, packed_batch(long=True), window=window, sinks=True)


@pytest.mark.parametrize("kind", KINDS)
def test_one_token_prompt_with_window_and_sinks(kind):
    packed = packed_batch(one_token_prompt=True, long=True)
    assert packed.prefix_lengths.min() == 0
    check(kind, packed, window=3, sinks=True, heads=6, kv_heads=1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dim,v_dim", [(12, 8), (8, 12)])
def test_mla_value_head_dim_differs(kind, dim, v_dim):
    check(kind, packed_batch(), dim=dim, v_dim=v_dim, window=4, sinks=kind != "materialized")


@pytest.mark.parametrize("window", [None, 4])
def test_softcap_takes_the_materialized_path_exactly(window):
    check("merged", packed_batch(long=True), window=window, softcap=2.0)


def test_window_never_materialises_block_by_prefix_scores():
    """Peak memory of the windowed fused path stays far below one (G*R x P) score tensor."""

    prefix, block, blocks, heads, dim, window = 1024, 257, 8, 4, 16, 128
    layout = GroupedAttentionLayout(prefix_width=prefix, block_width=block, num_blocks=blocks)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, heads, prefix + blocks * block, dim, generator=gen, requires_grad=True) for _ in range(3)
    )
    score_bytes = heads * blocks * block * prefix * 4

    peak = peak_backward_bytes

    def dense():  # the control: one explicit score tensor of all block queries against the prefix keys
        scores = q[:, :, prefix:] @ k[:, :, :prefix].transpose(-1, -2)
        return scores.softmax(-1) @ v[:, :, :prefix]

    assert peak(dense) > score_bytes  # the measurement sees a score tensor when there is one
    plain = peak(lambda: split_attention(q, k, v, layout))
    windowed = peak(lambda: split_attention(q, k, v, layout, sliding_window=window, sinks=torch.zeros(heads)))
    assert plain < score_bytes / 4, (plain, score_bytes)
    # the window's chunked key copies cost a fraction of the fused path's own memory, nowhere near a score tensor
    assert windowed < 1.5 * plain, (windowed, plain)


def test_rejects_malformed_window():
    packed = packed_batch()
    layout = GroupedAttentionLayout.from_packed(packed)
    q = torch.randn(packed.num_rows, 2, packed.seq_len, 8)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=rf"sliding_window={bad!r}"):
            split_attention(q, q, q, layout, sliding_window=bad)


# ---------------------------------------------------------------------------------------------------------------
# Through the trainer: stock GRPOTrainer vs PrefixGrouperGRPOTrainer on tiny models of each family (fp32)

WINDOW = 4  # the test batch has prompts of 3 and 7 tokens and blocks of up to 8: the window cuts prefix and blocks
COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
    bos_token_id=None,
    eos_token_id=1,
)
# MLA keys have one head per query head; query/key head dim 8 + 4, value head dim set per family
MLA = {
    **COMMON,
    **dict(
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, head_dim=4
    ),
}


def family_config(family: str):
    """A tiny config of each family whose attention uses a window, a sink, a soft-cap or MLA head dims."""
    import transformers as tf

    both = ["full_attention", "sliding_attention"]
    configs = {
        "mistral": lambda: tf.MistralConfig(**COMMON, sliding_window=WINDOW),
        "qwen2": lambda: tf.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
        "phi3": lambda: tf.Phi3Config(**COMMON, sliding_window=WINDOW),
        "starcoder2": lambda: tf.Starcoder2Config(**COMMON, sliding_window=WINDOW, use_bias=True),
        "gemma2": lambda: tf.Gemma2Config(
            **COMMON,
            head_dim=8,
            sliding_window=WINDOW,
            layer_types=both,
            attn_logit_softcapping=1.5,
            final_logit_softcapping=None,
        ),
        "gemma3": lambda: tf.Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=WINDOW, layer_types=both[::-1]),
        "gpt_oss": lambda: tf.GptOssConfig(
            **COMMON,
            head_dim=8,
            sliding_window=WINDOW,
            layer_types=both[::-1],
            num_local_experts=4,
            num_experts_per_tok=2,
            router_aux_loss_coef=0.0,
        ),
        "deepseek_v2": lambda: tf.DeepseekV2Config(
            **MLA,
            v_head_dim=12,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
        ),
        "deepseek_v3": lambda: tf.DeepseekV3Config(
            **MLA,
            v_head_dim=6,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
        ),
        "minicpm3": lambda: tf.MiniCPM3Config(**MLA, v_head_dim=10, dim_model_base=32, scale_emb=1),
        "glm4_moe_lite": lambda: tf.Glm4MoeLiteConfig(
            **MLA,
            v_head_dim=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            mlp_layer_types=["dense", "sparse"],
            n_group=1,
            topk_group=1,
        ),
    }
    return configs[family]()


def family_trainer(family: str, attn: str, grouped: bool, tmp_path, **overrides):
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from peft_trl_testbed import arithmetic_reward, build_toy_tokenizer, make_arithmetic_dataset, toy_args
    from trl_ext import PrefixGrouperGRPOConfig, PrefixGrouperGRPOTrainer

    config = family_config(family)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = sharpen_(AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # sinks large enough to take a real share of the softmax
        for name, param in model.named_parameters():
            if name.endswith("sinks"):
                param.copy_(torch.randn(param.shape, generator=gen))
            if family.startswith("gemma") and name.endswith("embed_tokens.weight"):
                param.mul_(config.hidden_size**-0.5)  # Gemma scales embeddings up by sqrt(hidden): keep logits sane
    config_cls, trainer_cls = (
        (PrefixGrouperGRPOConfig, PrefixGrouperGRPOTrainer) if grouped else (GRPOConfig, GRPOTrainer)
    )
    args = toy_args(
        config_cls,
        tmp_path / f"{family}-{attn}-{grouped}",
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=7,
        disable_dropout=True,
        **overrides,
    )
    trainer = trainer_cls(
        model=model,
        reward_funcs=arithmetic_reward,
        args=args,
        train_dataset=make_arithmetic_dataset(8),
        processing_class=build_toy_tokenizer(),
    )
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


def ablations(model):
    """Context managers that switch off, in the stock model, each feature the family uses: its sliding window, its
    soft-cap, its sinks. Each must change the stock log-probs on the test batch, or the comparison proves nothing."""
    import contextlib

    @contextlib.contextmanager
    def setting(objects, name, value):
        saved = [getattr(obj, name) for obj in objects]
        saved = [old.data if isinstance(old, torch.Tensor) else old for old in saved]  # .data: the old storage
        for obj, old in zip(objects, saved):
            if isinstance(old, torch.Tensor):
                getattr(obj, name).data = torch.full_like(old, value)
            else:
                setattr(obj, name, value)
        try:
            yield
        finally:
            for obj, old in zip(objects, saved):
                if isinstance(old, torch.Tensor):
                    getattr(obj, name).data = old
                else:
                    setattr(obj, name, old)

    found = {}
    if getattr(model.config, "sliding_window", None):
        found["sliding window"] = setting([model.config], "sliding_window", 10**6)  # the masks read the config
    capped = [m for m in model.modules() if getattr(m, "attn_logit_softcapping", None)]
    if capped:
        found["soft-cap"] = setting(capped, "attn_logit_softcapping", None)
    sinks = [m for m in model.modules() if isinstance(getattr(m, "sinks", None), torch.Tensor)]
    if sinks:
        found["sinks"] = setting(sinks, "sinks", -1e4)
    return found


CASES = [
    # sliding-window layers (all layers, or mixed with full layers through layer_types)
    *[("mistral", a) for a in ("sdpa", "eager")],
    *[("qwen2", a) for a in ("sdpa", "eager")],
    *[("phi3", a) for a in ("sdpa", "eager")],
    *[("starcoder2", a) for a in ("sdpa", "eager")],
    *[("gemma3", a) for a in ("sdpa", "eager")],
    ("gemma2", "eager"),  # soft-capping + sliding layers; eager only (as in transformers)
    ("gpt_oss", "eager"),  # attention sinks + sliding layers; eager only (as in transformers)
    # MLA: value head dim differs from the query/key head dim
    *[(f, a) for f in ("deepseek_v2", "deepseek_v3", "minicpm3", "glm4_moe_lite") for a in ("sdpa", "eager")],
]


@pytest.mark.parametrize("family,attn", CASES)
def test_family_matches_stock_through_the_trainer(family, attn, tmp_path):
    stock = family_trainer(family, attn, False, tmp_path)
    grouped = family_trainer(family, attn, True, tmp_path)
    assert grouped.model.config._attn_implementation == f"prefix_grouper_{attn}"
    batch = make_batch(seed=3, rows="abababab")  # two prompts (3 and 7 tokens) x 4 completions, left-padded
    with torch.no_grad():
        for batch_size in (None, 2):  # whole, and in the chunks TRL scores old and reference log-probs with
            s_logps, s_ent, _ = logps_of(stock, stock.model, batch, batch_size)
            g_logps, g_ent, _ = logps_of(grouped, grouped.model, batch, batch_size)
            assert_close(g_logps, s_logps, what=f"log-probs, batch_size={batch_size}")
            assert_close(g_ent, s_ent, what=f"entropies, batch_size={batch_size}")
        for feature, switched_off in ablations(stock.model).items():
            with switched_off:  # the feature really changes the stock result on this batch
                assert (logps_of(stock, stock.model, batch)[0] - s_logps).abs().max() > 1e-3, feature
    s_loss, s_grads = loss_and_grads(stock, batch)
    g_loss, g_grads = loss_and_grads(grouped, batch)
    assert_close(g_loss, s_loss, what="loss")
    for name in s_grads:
        assert_close(g_grads[name], s_grads[name], what=f"grad of {name}")


def test_rejects_sliding_mask_the_attention_is_not_told_about_at_construction(tmp_path):
    """Qwen2-MoE builds sliding-window masks for its sliding layers but does not pass the window to its attention
    function: the grouped forward cannot see the mask, so the model is refused when the trainer is built."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    from peft_trl_testbed import arithmetic_reward, build_toy_tokenizer, make_arithmetic_dataset, toy_args
    from trl_ext import PrefixGrouperGRPOConfig, PrefixGrouperGRPOTrainer

    config = Qwen2MoeConfig(
        **COMMON,
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        router_aux_loss_coef=0.0,
        attn_implementation="sdpa",
    )
    assert "sliding_attention" in config.layer_types
    model = AutoModelForCausalLM.from_config(config)
    args = toy_args(PrefixGrouperGRPOConfig, tmp_path, per_device_train_batch_size=4, num_generations=4)
    with pytest.raises(ValueError, match=r"model_type='qwen2_moe'.*sliding_window=None.*sliding_window=4.*stock"):
        PrefixGrouperGRPOTrainer(
            model=model,
            reward_funcs=arithmetic_reward,
            args=args,
            train_dataset=make_arithmetic_dataset(8),
            processing_class=build_toy_tokenizer(),
        )


def test_rejects_unknown_layer_types_and_bad_windows():
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    from trl_ext.prefix_grouper import install_grouped_attention

    config = Qwen2Config(**COMMON, attn_implementation="sdpa", layer_types=["full_attention", "chunked_attention"])
    with pytest.raises(ValueError, match=r"model_type='qwen2'.*chunked_attention.*stock `trl.GRPOTrainer`"):
        install_grouped_attention(AutoModelForCausalLM.from_config(config))
    model = AutoModelForCausalLM.from_config(MistralConfig(**COMMON, sliding_window=4, attn_implementation="sdpa"))
    model.config.sliding_window = 0
    with pytest.raises(ValueError, match=r"model_type='mistral'.*sliding_window=0.*stock `trl.GRPOTrainer`"):
        install_grouped_attention(model)


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v2"])
def test_bf16_drift_is_no_worse_than_stock(family, tmp_path):
    """Under bf16 autocast, the grouped gradient (window + sinks, or MLA) is within 2x the stock bf16 gradient's
    distance from the fp32 gradient, the bound the other architectures meet."""
    batch = make_batch(seed=12, rows="abababab")

    def gradient(trainer):
        trainer.model.zero_grad(set_to_none=True)
        with trainer.accelerator.autocast():
            loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        return torch.cat([p.grad.flatten().double() for p in trainer.model.parameters() if p.requires_grad])

    attn = "eager" if family == "gpt_oss" else "sdpa"
    reference = gradient(family_trainer(family, attn, False, tmp_path / "fp32"))
    drift = {}
    for grouped in (False, True):
        trainer = family_trainer(family, attn, grouped, tmp_path / "bf16", bf16=True, use_cpu=True)
        assert trainer.accelerator.mixed_precision == "bf16"
        drift[grouped] = ((gradient(trainer) - reference).norm() / reference.norm()).item()
    assert drift[False] > 1e-4  # autocast really ran in bf16
    assert drift[True] <= 2 * drift[False], drift


def test_rejects_sinks_without_eager():
    """Stock sdpa does not apply attention sinks: the grouped sdpa function refuses a layer that passes them."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    from trl_ext.prefix_grouper import register_grouped_attention
    from trl_ext.prefix_grouper.attention import LAYOUT_KWARG

    register_grouped_attention()
    grouped_sdpa = AttentionInterface._global_mapping["prefix_grouper_sdpa"]
    layer = AutoModelForCausalLM.from_config(family_config("gpt_oss")).model.layers[0].self_attn
    packed = packed_batch()
    q = torch.randn(packed.num_rows, 4, packed.seq_len, 8)
    layout = GroupedAttentionLayout.from_packed(packed)
    with pytest.raises(ValueError, match=r"model_type='gpt_oss'.*sinks need attn_implementation='eager'.*stock"):
        grouped_sdpa(
            layer,
            q,
            q[:, :2],
            q[:, :2],
            None,
            sliding_window=layer.sliding_window,
            s_aux=layer.sinks,
            **{LAYOUT_KWARG: layout},
        )


@pytest.mark.parametrize("family,attn", [("gpt_oss", "eager"), ("deepseek_v2", "sdpa")])
def test_lower_right_kernel_through_the_trainer(family, attn, tmp_path, monkeypatch):
    """The CUDA kernel (public SDPA), forced on CPU: windows + sinks, and MLA, match stock through the trainer."""
    from_packed = GroupedAttentionLayout.from_packed.__func__
    kernels = []

    def lower_right(cls, packed):
        layout = from_packed(cls, packed)
        layout.kernel = "lower_right"
        kernels.append(layout)
        return layout

    monkeypatch.setattr(GroupedAttentionLayout, "from_packed", classmethod(lower_right))
    stock = family_trainer(family, attn, False, tmp_path)
    grouped = family_trainer(family, attn, True, tmp_path)
    batch = make_batch(seed=3, rows="abababab")
    with torch.no_grad():
        for batch_size in (None, 2):
            expected = logps_of(stock, stock.model, batch, batch_size)[0]
            assert_close(logps_of(grouped, grouped.model, batch, batch_size)[0], expected, what="log-probs")
    assert kernels and all(layout.calls for layout in kernels)
    s_grads, g_grads = loss_and_grads(stock, batch)[1], loss_and_grads(grouped, batch)[1]
    for name in s_grads:
        assert_close(g_grads[name], s_grads[name], what=f"grad of {name}")
