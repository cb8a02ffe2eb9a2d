"""The construction-time self-check (trl_ext.prefix_grouper.selfcheck) and the models it decides about.

Every refusal test is paired with an assertion that, with the self-check switched off, the grouped log-probs of that
model really differ from the stock trainer's: the refusal is what keeps the run from being silently wrong.
"""

import pytest
import torch
from prefix_grouper_helpers import assert_close, logps_of, make_batch, quantized_llama, tiny_model, trainer_for_model
from test_prefix_grouper import compare

from peft_trl_testbed import arithmetic_reward, build_toy_tokenizer, make_arithmetic_dataset, toy_args
from trl_ext import PrefixGrouperGRPOConfig, PrefixGrouperGRPOTrainer
from trl_ext.prefix_grouper.attention import LAYOUT_KWARG, GroupedAttentionLayout, install_grouped_attention
from trl_ext.prefix_grouper.layout import find_groups, pack_groups, ungroup
from trl_ext.prefix_grouper.selfcheck import (
    RTOL,
    tolerance,
    zero_parameters_perturbed,
)

FALLBACK = r"stock `trl.GRPOTrainer`"


def unchecked(monkeypatch):
    """Switch the self-check off (what the trainer would do without it), for the 'really differs' assertions."""
    monkeypatch.setattr(PrefixGrouperGRPOTrainer, "_prefix_grouper_self_check", lambda self: None)


def stock_and_grouped_differ(model_factory, tmp_path, monkeypatch, batch_size=None) -> float:
    """Max |grouped - stock| log-prob on the test batch with the self-check off."""
    stock = trainer_for_model(model_factory(), False, tmp_path)
    with monkeypatch.context() as patch:
        unchecked(patch)
        grouped = trainer_for_model(model_factory(), True, tmp_path)
        grouped._prefix_grouper_count_padding = True  # the layout's default positions
        grouped._prefix_grouper_unchecked = []  # not checked at the first log-probs either
    batch = make_batch(seed=1)
    with torch.no_grad():
        expected = logps_of(stock, stock.model.eval(), batch, batch_size)[0]
        actual = logps_of(grouped, grouped.model.eval(), batch, batch_size)[0]
    return (actual - expected)[batch["completion_mask"].bool()].abs().max().item()


# ------------------------------------------------------------------ refusals at construction
def bart_family(model_type):
    def build():
        return tiny_model(
            model_type,
            d_model=32,
            decoder_layers=2,
            decoder_attention_heads=4,
            decoder_ffn_dim=64,
            encoder_layers=1,
            encoder_attention_heads=4,
            encoder_ffn_dim=64,
        )

    return build


@pytest.mark.parametrize("model_type", ["bart"])  # the sweep checks the rest of the family
def test_self_check_refuses_decoders_that_ignore_position_ids(model_type, tmp_path, monkeypatch):
    build = bart_family(model_type)
    with pytest.raises(
        ValueError,
        match=rf"model_type='{model_type}'.*differ from its own stock forward by up to .*does not change with "
        rf"position_ids.*{FALLBACK}",
    ):
        trainer_for_model(build(), True, tmp_path)
    assert stock_and_grouped_differ(build, tmp_path, monkeypatch) > 0.5


def doge(perturb_a: bool):
    def build():
        model = tiny_model("doge", num_key_value_heads=2, router_aux_loss_coef=0.0)
        if perturb_a:  # the dynamic-mask gain, zero at initialisation, as training would move it
            gen = torch.Generator().manual_seed(3)
            with torch.no_grad():
                for layer in model.model.layers:
                    layer.self_attn.A.copy_(torch.randn(layer.self_attn.A.shape, generator=gen))
        return model

    return build


def test_self_check_refuses_a_mask_carried_bias_even_before_it_is_trained(tmp_path, monkeypatch):
    # Doge's dynamic bias is constant (exactly neutral) while its gain A is zero, as at initialisation: the self-check
    # sets all-zero parameters to random values, so the model is refused before training moves A
    assert not any(layer.self_attn.A.any() for layer in doge(False)().model.layers)
    refusal = rf"model_type='doge'.*differ from its own stock forward.*add to the attention mask.*{FALLBACK}"
    with pytest.raises(ValueError, match=refusal):
        trainer_for_model(doge(False)(), True, tmp_path)
    with pytest.raises(ValueError, match=refusal):
        trainer_for_model(doge(True)(), True, tmp_path)
    assert stock_and_grouped_differ(doge(True), tmp_path, monkeypatch) > 0.5


def test_self_check_refuses_falcon_alibi_instead_of_crashing(tmp_path):
    model = tiny_model("falcon", alibi=True, new_decoder_architecture=False, multi_query=True)
    # transformers 5.23's Falcon computes attention itself (refused when installing the grouped attention); 5.25's
    # goes through the AttentionInterface, and the self-check's forward on the packed rows refuses ALiBi
    refusal = rf"model_type='falcon'.*(packed rows|does not go through transformers' AttentionInterface).*{FALLBACK}"
    with pytest.raises(ValueError, match=refusal):
        trainer_for_model(model, True, tmp_path)


def test_self_check_runs_at_the_first_log_probs_when_weights_are_not_materialised(tmp_path, monkeypatch):
    # As under DeepSpeed ZeRO-3, where parameters are partitioned when the trainer is built
    monkeypatch.setattr("trl_ext.prefix_grouper.trainer.weights_materialised", lambda model: False)
    grouped = trainer_for_model(bart_family("bart")(), True, tmp_path)
    with pytest.raises(ValueError, match=rf"model_type='bart'.*position_ids.*{FALLBACK}"):
        logps_of(grouped, grouped.model, make_batch())


# ------------------------------------------------------------------ positions from the attention mask (OPT)
def opt(attn="sdpa"):
    # dropout=0: OPT applies its dropout functionally, which TRL's disable_dropout does not switch off. No biases:
    # the key bias has an analytically zero gradient, which a relative comparison of rounding noise cannot check
    return lambda: tiny_model("opt", attn=attn, ffn_dim=64, word_embed_proj_dim=32, dropout=0.0, enable_bias=False)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_models_numbering_positions_from_the_mask_match_stock(attn, tmp_path):
    stock = trainer_for_model(opt(attn)(), False, tmp_path)
    grouped = trainer_for_model(opt(attn)(), True, tmp_path)
    assert grouped._prefix_grouper_count_padding is False  # learned from the stock forward
    compare(stock, grouped, make_batch(seed=2), batch_size=3 if attn == "eager" else None)


def test_self_check_catches_mask_positions_with_column_positions(tmp_path, monkeypatch):
    # Forced to the column convention, OPT is refused; and it would indeed be wrong
    monkeypatch.setattr("trl_ext.prefix_grouper.selfcheck.POSITION_CONVENTIONS", {"columns": True})
    with pytest.raises(ValueError, match=rf"model_type='opt'.*differ from its own stock forward by up to.*{FALLBACK}"):
        trainer_for_model(opt()(), True, tmp_path)
    assert stock_and_grouped_differ(opt(), tmp_path, monkeypatch) > 0.5


@pytest.mark.parametrize("family", ["opt", "dynamic_rope"])
def test_bf16_drift_is_no_worse_than_stock(family, tmp_path):
    build = opt() if family == "opt" else dynamic_rope
    batch = make_batch(seed=12)

    def gradient(trainer):
        trainer.model.zero_grad(set_to_none=True)
        with trainer.accelerator.autocast():
            loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        return torch.cat([p.grad.flatten().double() for p in trainer.model.parameters() if p.requires_grad])

    reference = gradient(trainer_for_model(build(), False, tmp_path / "fp32"))
    drift = {}
    for grouped in (False, True):
        trainer = trainer_for_model(build(), grouped, tmp_path / f"bf16-{grouped}", bf16=True, use_cpu=True)
        assert trainer.accelerator.mixed_precision == "bf16"
        drift[grouped] = ((gradient(trainer) - reference).norm() / reference.norm()).item()
    assert drift[False] > 1e-4
    assert drift[True] <= 2 * drift[False], drift


# ------------------------------------------------------------------ length-dependent RoPE
def dynamic_rope(attn="sdpa"):
    # Sequences of the test batch reach position 17, past max_position_embeddings=12: the frequencies then depend on
    # the forward's largest position, which differs between a packed chunk and the stock padded batch
    return tiny_model(
        "llama",
        attn=attn,
        num_key_value_heads=2,
        max_position_embeddings=12,
        rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
    )


def longrope(attn="sdpa"):
    half = 4  # head_dim 8 / 2
    return tiny_model(
        "phi3",
        attn=attn,
        num_key_value_heads=2,
        max_position_embeddings=64,
        original_max_position_embeddings=12,
        pad_token_id=0,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "original_max_position_embeddings": 12,
            "short_factor": [1.0 + i for i in range(half)],
            "long_factor": [3.0 + 2 * i for i in range(half)],
        },
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("build", [dynamic_rope, longrope], ids=["dynamic", "longrope"])
def test_length_dependent_rope_matches_stock_in_chunks(build, attn, tmp_path):
    stock = trainer_for_model(build(attn), False, tmp_path)
    grouped = trainer_for_model(build(attn), True, tmp_path)
    compare(stock, grouped, make_batch(seed=5, rows="abcabcab"), batch_size=3)
    batch = make_batch(seed=6, rows="aabb")  # a chunk of short rows only, whose own largest position is lower
    with torch.no_grad():
        expected = logps_of(stock, stock.model, batch, batch_size=2)[0]
        assert_close(logps_of(grouped, grouped.model, batch, batch_size=2)[0], expected, what="chunks of 2")


@pytest.mark.parametrize("build", [dynamic_rope, longrope], ids=["dynamic", "longrope"])
def test_length_dependent_rope_needs_the_stock_largest_position(build):
    # Without the padding cell that carries the stock forward's largest position, a chunk of short rows gets other
    # frequencies: the cell is what makes the test above pass
    model = build().eval()
    install_grouped_attention(model)
    batch = make_batch(seed=6, rows="aabb")
    rows = [[0, 1]]  # one chunk: the short group, whose own largest position stays below the threshold
    groups = [g for g in find_groups(batch["prompt_ids"], batch["prompt_mask"]) if g == rows[0]]
    width = batch["prompt_ids"].size(1) + batch["completion_ids"].size(1)
    logps = []
    for max_position in (None, width - 1):
        packed = pack_groups(
            batch["prompt_ids"],
            batch["prompt_mask"],
            batch["completion_ids"],
            batch["completion_mask"],
            groups,
            max_position=max_position,
        )
        with torch.no_grad():
            logits = model(
                input_ids=packed.input_ids,
                attention_mask=packed.segment_ids[:, None, None, :],
                position_ids=packed.position_ids,
                **{LAYOUT_KWARG: GroupedAttentionLayout.from_packed(packed)},
            ).logits
        labels = packed.shift_labels.clamp(min=0)
        logps.append(ungroup(logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0], packed))
    assert (logps[0] - logps[1]).abs().max() > 1e-3


# ------------------------------------------------------------------ sliding windows: exact, or refused when built
def mistral(window):
    return lambda: tiny_model("mistral", num_key_value_heads=2, sliding_window=window, max_position_embeddings=64)


def test_sliding_window_shorter_than_the_rows_is_exact(tmp_path):
    # The window cuts inside the prompts and the completions of the batch: applied by position, as stock does
    stock = trainer_for_model(mistral(6)(), False, tmp_path)
    grouped = trainer_for_model(mistral(6)(), True, tmp_path)
    compare(stock, grouped, make_batch(seed=8), batch_size=3)


# ------------------------------------------------------------------ the check's pieces
def test_tolerance_scales_with_dtype_and_log_prob_size():
    logps = torch.tensor([-0.5, -12.0])
    assert tolerance(torch.float32, logps) == pytest.approx(RTOL[torch.float32] * 12)
    assert tolerance(torch.bfloat16, logps) > 100 * tolerance(torch.float32, logps)
    assert tolerance(torch.float32, torch.tensor([-0.1])) == pytest.approx(RTOL[torch.float32])


def test_zero_parameters_are_perturbed_and_restored_exactly():
    model = tiny_model("opt", ffn_dim=64, word_embed_proj_dim=32)
    with torch.no_grad():
        model.model.decoder.layers[0].self_attn.q_proj.bias.zero_()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with zero_parameters_perturbed(model) as names:
        assert "model.decoder.layers.0.self_attn.q_proj.bias" in names
        assert model.model.decoder.layers[0].self_attn.q_proj.bias.abs().min() > 0
        assert all(before[name].any() for name in before if name not in names)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


@pytest.mark.parametrize("training", [True, False])
def test_self_check_leaves_training_mode_and_weights_alone(training, tmp_path):
    model = tiny_model("opt", ffn_dim=64, word_embed_proj_dim=32, dropout=0.0).train(training)
    with torch.no_grad():
        model.model.decoder.layers[1].fc1.bias.zero_()  # zero-initialised: perturbed by the check, then restored
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = toy_args(PrefixGrouperGRPOConfig, tmp_path, per_device_train_batch_size=4, num_generations=4)
    trainer = PrefixGrouperGRPOTrainer(
        model=model,
        reward_funcs=arithmetic_reward,
        args=args,
        train_dataset=make_arithmetic_dataset(8),
        processing_class=build_toy_tokenizer(),
    )
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, before[name]), name
    assert all(module.training == training for module in trainer.model.modules())


def test_sliding_window_passed_by_the_layers_is_applied_even_when_the_config_hides_it(tmp_path):
    # Mistral applies config.sliding_window whatever use_sliding_window says: the window the attention layers
    # receive is the one applied, not what the config claims
    def build():
        model = mistral(6)()
        model.config.use_sliding_window = False
        return model

    stock = trainer_for_model(build(), False, tmp_path)
    grouped = trainer_for_model(build(), True, tmp_path)
    compare(stock, grouped, make_batch(seed=8), batch_size=3)


def test_tolerance_dtype_is_the_least_precise_compute_dtype():
    from trl_ext.prefix_grouper.trainer import compute_dtype

    model = tiny_model("llama", num_key_value_heads=2)
    assert compute_dtype(model) == torch.float32
    assert compute_dtype(model, torch.bfloat16) == torch.bfloat16  # fp32 weights under bf16 autocast
    assert compute_dtype(model.to(torch.float16)) == torch.float16
    model.float().model.norm.half()  # type promotion keeps the forward in fp32
    assert compute_dtype(model) == torch.float32
    model.model.layers[0].mlp.register_parameter(
        "packed", torch.nn.Parameter(torch.zeros(4, dtype=torch.uint8), requires_grad=False)
    )
    assert compute_dtype(model.float()) == torch.bfloat16  # unknown integer weights compute in low precision


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [("bnb_4bit", torch.float32), ("torchao_int8", torch.float32), ("bnb_8bit", torch.bfloat16)],
)
def test_tolerance_dtype_of_quantised_bases(fmt, expected, tmp_path):
    # 4-bit with bnb_4bit_compute_dtype=float32 and int8 weight-only compute in fp32 and are checked at fp32's
    # tolerance; LLM.int8 quantises activations in eval mode, which bf16's tolerance stands for
    from peft import LoraConfig, get_peft_model

    from trl_ext.prefix_grouper.trainer import compute_dtype

    model = get_peft_model(quantized_llama(fmt, tmp_path), LoraConfig(r=4, target_modules=["q_proj"]))
    assert compute_dtype(model) == expected
    for param in model.parameters():  # adapters in bf16, as TRL casts them on bitsandbytes bases
        if param.requires_grad:
            param.data = param.data.bfloat16()
    assert compute_dtype(model) == torch.bfloat16


def phimoe(window):
    return lambda: tiny_model(
        "phimoe",
        num_key_value_heads=2,
        sliding_window=window,
        num_local_experts=4,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.0,
    )


def test_sliding_window_applied_through_the_mask_only_is_refused(tmp_path, monkeypatch):
    # PhiMoE applies its window through the attention mask alone: the split attention never sees it, whatever
    # windows it supports, so a window the sequences can outgrow is refused when the trainer is built
    # (refused by the layer's window check, or failing that by the config check)
    refusal = (
        rf"model_type='phimoe'.*(stock mask uses sliding_window=32|sliding_window=32.*attention mask only).*{FALLBACK}"
    )
    with pytest.raises(ValueError, match=refusal):
        trainer_for_model(phimoe(32)(), True, tmp_path)
    # Without the self-check, the split attention itself refuses the window it is not given: never silent
    with pytest.raises(ValueError, match="passes sliding_window=None to its attention but its stock mask uses"):
        stock_and_grouped_differ(phimoe(4), tmp_path, monkeypatch)


def test_refuses_randomness_in_training_mode_that_completions_would_share(tmp_path):
    # Llama's attention dropout is applied functionally (disable_dropout does not reach it): the packed row would
    # draw one mask for the prompt all G completions share
    model = tiny_model("llama", num_key_value_heads=2, attention_dropout=0.1)
    with pytest.raises(ValueError, match=rf"random in training mode \(attention_dropout=0.1\).*{FALLBACK}"):
        trainer_for_model(model, True, tmp_path)
    trainer_for_model(tiny_model("llama", num_key_value_heads=2, attention_dropout=0.1), False, tmp_path)  # stock
