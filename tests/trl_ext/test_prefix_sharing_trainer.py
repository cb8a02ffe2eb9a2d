"""PrefixSharingDPOTrainer and REDI's prefix sharing against the stock trainers, one fp32 SGD step on the same data.

The measure is the one the method promises: the weight update of the shared trainer equals the stock trainer's, per
tensor, to ``1e-5`` of the update's own largest entry. The step is plain SGD with a learning rate of 1000: the update
is then the gradient, large enough next to the weights that fp32 storage rounding of ``w0 - lr * g`` does not blur
it (Adam's first step would divide each gradient by its own size and amplify rounding in near-zero entries). Every test also checks that the
shared path really ran (``rule.calls``), so a silent fallback to the stock forward cannot pass for exactness.
"""

import copy

import pytest
import torch
from datasets import Dataset
from distributed_helpers import run_distributed
from peft import LoraConfig, PromptTuningConfig
from prefix_grouper_helpers import (
    QUANTIZED_FORMATS,
    fp32_adapters_,
    quantized_llama,
    sharpen_,
    tiny_model,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer

from peft_ext._quantized import repacked_4bit_layers
from peft_trl_testbed import build_toy_moe_model, build_toy_tokenizer, make_reasoning_preferences, toy_args
from trl_ext import PrefixSharingDPOConfig, PrefixSharingDPOTrainer, REDIConfig, REDITrainer

LOSS_TYPES = [
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]
RTOL = 1e-5
FALLBACK = r"set `prefix_sharing=False` in the config"


def llama(**config):
    return tiny_model("llama", num_key_value_heads=2, max_position_embeddings=256, **config)


def gpt2():
    return tiny_model("gpt2", max_position_embeddings=256)


def long_prompts(n: int = 4, seed: int = 0) -> Dataset:
    """Preference pairs whose prompts are long next to their completions (as where sharing pays), with prompts of
    different lengths and chosen/rejected of different lengths."""
    data = make_reasoning_preferences(n, seed=seed)
    context = "Context: " + " ".join(f"{i} + {i + 1} = {2 * i + 1}." for i in range(6)) + "\n"
    return data.map(lambda row, i: {"prompt": context[: 40 + 17 * i] + row["prompt"]}, with_indices=True)


def conversational(n: int = 4) -> Dataset:
    data = long_prompts(n)
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p in data["prompt"]],
            "chosen": [[{"role": "assistant", "content": c}] for c in data["chosen"]],
            "rejected": [[{"role": "assistant", "content": r}] for r in data["rejected"]],
        }
    )


def sgd_step(
    shared,
    model,
    dataset=None,
    ref_model=None,
    config=None,
    trainer_cls=None,
    peft_config=None,
    train=True,
    **overrides,
):
    """One SGD step of the stock (``shared=False``) or shared trainer; returns (trainer, weights before the step).
    With ``train=False`` the trainer is only built."""
    trainer_cls = trainer_cls or (PrefixSharingDPOTrainer if shared else DPOTrainer)
    config = config or (PrefixSharingDPOConfig if shared else DPOConfig)
    sharing = dict(prefix_sharing=shared, prefix_sharing_min_prompt_ratio=0.0) if config is not DPOConfig else {}
    settings = dict(
        max_steps=1,
        per_device_train_batch_size=4,
        optim="sgd",
        learning_rate=1000.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        disable_tqdm=True,
        **sharing,
    )
    args = toy_args(config, "out", **{**settings, **overrides})
    needs_reference = config is not REDIConfig and peft_config is None and not hasattr(model, "peft_config")
    needs_reference = needs_reference and not overrides.get("precompute_ref_log_probs")
    if ref_model is None and needs_reference and not model.config.name_or_path:
        ref_model = copy.deepcopy(model)  # DPOTrainer would load the reference from the policy's (empty) path
    kwargs = {} if ref_model is None else {"ref_model": ref_model}
    if peft_config is not None:
        kwargs["peft_config"] = peft_config
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=dataset if dataset is not None else long_prompts(),
        processing_class=build_toy_tokenizer(),
        **kwargs,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    if train:
        trainer.train()
    return trainer, before


def update_difference(stock, shared, before) -> float:
    """Largest, over trained tensors, of max |update_shared - update_stock| / max |update_stock|, beyond the one
    rounding of storing each updated weight in its dtype."""
    stock_params, shared_params = dict(stock.model.named_parameters()), dict(shared.model.named_parameters())
    return max_update_difference(
        {n: stock_params[n].detach() for n in before}, {n: shared_params[n].detach() for n in before}, before
    )


def max_update_difference(expected_weights, actual_weights, before) -> float:
    worst, moved = 0.0, 0
    for name, w0 in before.items():
        after = expected_weights[name]
        expected, actual = after - w0, actual_weights[name] - w0
        scale = expected.abs().max().item()
        if scale == 0:
            assert actual.abs().max().item() == 0, name
            continue
        moved += 1
        storage = torch.finfo(after.dtype).eps * after.abs()
        worst = max(worst, ((actual - expected).abs() - storage).clamp(min=0).max().item() / scale)
    assert moved, "nothing was trained"
    return worst


def compare(build, dataset=None, ref=False, expect_logs=True, **overrides):
    """Stock and shared trainer from identical models; returns the shared trainer after asserting exactness."""
    refs = [sharpen_(build(), seed=7) if ref else None for _ in range(2)]
    stock, before = sgd_step(False, build(), dataset, refs[0], **overrides)
    shared, _ = sgd_step(True, build(), dataset, refs[1], **overrides)
    assert shared.state.log_history[0]["prefix_sharing/packed_forwards"] == 1.0
    assert update_difference(stock, shared, before) <= RTOL
    if expect_logs:
        for key, value in stock.state.log_history[0].items():
            if key not in ("grad_norm",) and isinstance(value, float):
                assert shared.state.log_history[0][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    return shared


# ------------------------------------------------------------------ exact against stock DPO


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "discopop"])
def test_every_loss_type_with_a_reference_model(loss_type):
    extra = {"label_smoothing": 0.1} if loss_type in ("robust", "exo_pair") else {}
    compare(llama, ref=True, loss_type=[loss_type], **extra)


def test_discopop_as_close_to_the_fp64_model_as_stock():
    # DiscoPOP's mixing weight is sigmoid(logits / 0.05): it multiplies the rounding of the summed log-probs by 20,
    # so two fp32 forwards that round differently land ~3e-5 apart. Both are held to a run of the same trainer on
    # the model in fp64: the shared update may be at most 3x as far from it as the stock update is.
    def run(shared, dtype):
        return sgd_step(shared, llama().to(dtype), None, sharpen_(llama(), seed=7).to(dtype), loss_type=["discopop"])

    reference, before = run(False, torch.float64)
    stock_error = update_difference(reference, run(False, torch.float32)[0], before)
    shared_error = update_difference(reference, run(True, torch.float32)[0], before)
    assert shared_error <= 3 * stock_error and shared_error < 1e-3, (shared_error, stock_error)


def test_reference_model_loaded_by_the_trainer():
    # ref_model=None without PEFT: DPOTrainer builds the reference from the policy's path
    path = "tmp-prefix-sharing-policy"
    llama().save_pretrained(path)
    try:
        shared = compare(lambda: AutoModelForCausalLM.from_pretrained(path), expect_logs=True)
        assert shared.ref_model is not None
        assert shared.ref_model.config._attn_implementation == "prefix_grouper_sdpa"
    finally:
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def test_precomputed_reference_log_probs():
    shared = compare(llama, precompute_ref_log_probs=True)
    assert shared.ref_model is None and "ref_chosen_logps" in shared.train_dataset.column_names


def test_peft_adapter_with_the_disabled_adapter_as_reference():
    def build():
        from peft import get_peft_model

        model = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        gen = torch.Generator().manual_seed(4)
        with torch.no_grad():  # a fresh adapter equals the reference; move it so the log-ratios are not zero
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn(param.shape, generator=gen) * 0.05)
        return model

    shared = compare(build)
    assert shared.ref_model is None


@pytest.mark.parametrize(
    "build",
    [gpt2, lambda: tiny_model("qwen2", num_key_value_heads=2, max_position_embeddings=256)],
    ids=["gpt2", "qwen2"],
)
def test_other_architectures(build):
    compare(build, ref=True)


def test_conversational_data():
    compare(llama, conversational(), ref=True)


def test_weighted_losses_length_desensitisation_and_wpo_weights():
    # (TRL cannot combine use_weighting with the "sft" loss: it scales an expanded tensor in place)
    compare(llama, ref=True, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5], ld_alpha=0.5, use_weighting=True)


@pytest.mark.filterwarnings("ignore:The `'keep_end'` truncation mode is deprecated:FutureWarning")
@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
def test_max_length_truncation_as_stock(truncation_mode):
    # keep_end cuts the prompts of a pair differently: those rows keep packed rows of their own, still exact
    compare(llama, ref=True, max_length=110, truncation_mode=truncation_mode)


def test_pairs_sharing_one_prompt_across_the_batch():
    data = long_prompts(2)
    twice = Dataset.from_dict({k: list(data[k]) * 2 for k in data.column_names})
    compare(llama, twice, ref=True)


def test_prefix_sharing_false_is_the_stock_trainer():
    stock, before = sgd_step(False, llama())
    off, _ = sgd_step(False, llama(), config=PrefixSharingDPOConfig, trainer_cls=PrefixSharingDPOTrainer)
    assert not hasattr(off.model.forward, "prefix_sharing_rule")
    assert off.model.config._attn_implementation == "sdpa"
    for name in before:
        assert torch.equal(dict(off.model.named_parameters())[name], dict(stock.model.named_parameters())[name])


def test_plain_dpo_config_gets_the_defaults():
    trainer = PrefixSharingDPOTrainer(
        model=llama(),
        ref_model=llama(),
        args=toy_args(DPOConfig, "out", max_steps=1, per_device_train_batch_size=4),
        train_dataset=long_prompts(),
        processing_class=build_toy_tokenizer(),
    )
    assert trainer._prefix_sharing_rule is not None
    assert trainer.model.config._attn_implementation == "prefix_grouper_sdpa"


def test_short_prompts_run_the_stock_forward_below_the_ratio():
    # The reasoning pairs' prompts are about as long as each completion, far below a ratio of 5: nothing is packed
    stock, before = sgd_step(False, llama(), make_reasoning_preferences(4))
    shared, _ = sgd_step(True, llama(), make_reasoning_preferences(4), prefix_sharing_min_prompt_ratio=5.0)
    assert shared.state.log_history[0]["prefix_sharing/packed_forwards"] == 0.0
    assert update_difference(stock, shared, before) == 0.0


# ------------------------------------------------------------------ REDI


def test_redi_prefix_sharing_matches_the_stock_forward():
    assert REDIConfig("out", use_cpu=True).prefix_sharing is None  # automatic

    def redi(shared):
        sharing = dict(prefix_sharing=shared, prefix_sharing_min_prompt_ratio=0.0)
        return sgd_step(shared, llama(), config=REDIConfig, trainer_cls=REDITrainer, **sharing)

    stock, before = redi(False)
    shared, _ = redi(True)
    assert shared.state.log_history[0]["prefix_sharing/packed_forwards"] == 1.0
    assert "prefix_sharing/packed_forwards" not in stock.state.log_history[0]
    assert update_difference(stock, shared, before) <= RTOL


def test_redi_automatic_sharing_falls_back_to_stock_on_a_refused_model():
    # Doge's attention-mask bias fails the self-check: by default REDI warns and runs the stock forward, exactly
    def doge():
        return tiny_model("doge", num_key_value_heads=2, router_aux_loss_coef=0.0, max_position_embeddings=256)

    stock, before = sgd_step(False, doge(), config=REDIConfig, trainer_cls=REDITrainer, prefix_sharing=False)
    auto, _ = sgd_step(False, doge(), config=REDIConfig, trainer_cls=REDITrainer, prefix_sharing=None)
    assert auto.args.prefix_sharing is None and auto._prefix_sharing_rule is None
    assert "prefix_sharing/packed_forwards" not in auto.state.log_history[0]
    assert update_difference(stock, auto, before) == 0.0
    with pytest.raises(ValueError, match=r"Prefix sharing cannot run model_type='doge'"):
        sgd_step(False, doge(), config=REDIConfig, trainer_cls=REDITrainer, prefix_sharing=True)


# ------------------------------------------------------------------ bf16


def test_bf16_drift_is_no_worse_than_stock():
    dataset = long_prompts(4, seed=3)

    def gradient(shared, **overrides):
        trainer, _ = sgd_step(shared, llama(), dataset, sharpen_(llama(), seed=7), train=False, **overrides)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.zero_grad(set_to_none=True)
        with trainer.accelerator.autocast():
            trainer.compute_loss(trainer.model, batch).backward()
        return torch.cat([p.grad.flatten().double() for p in trainer.model.parameters() if p.requires_grad])

    reference = gradient(False)
    drift = {}
    for shared in (False, True):
        drift[shared] = ((gradient(shared, bf16=True, use_cpu=True) - reference).norm() / reference.norm()).item()
    assert drift[False] > 1e-4
    assert drift[True] <= 2 * drift[False], drift


# ------------------------------------------------------------------ refusals before training


def test_refuses_prompt_learning_adapters():
    with pytest.raises(ValueError, match=r"PromptTuningConfig.*prompt-learning.*" + FALLBACK):
        sgd_step(True, llama(), peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))


def test_refuses_the_moe_load_balancing_loss():
    with pytest.raises(ValueError, match=r"router_aux_loss_coef=0.01.*" + FALLBACK):
        sgd_step(True, build_toy_moe_model(), router_aux_loss_coef=0.01)


def test_refuses_a_model_the_packed_forward_cannot_reproduce():
    # Doge adds a learned bias to the attention mask; the self-check refuses it, naming the stock fallback
    model = tiny_model("doge", num_key_value_heads=2, router_aux_loss_coef=0.0)
    with pytest.raises(ValueError, match=r"Prefix sharing cannot run model_type='doge'.*" + FALLBACK):
        sgd_step(True, model)


@pytest.mark.parametrize(
    "build",
    [
        lambda: llama(attention_dropout=0.1),  # functional attention dropout, which disable_dropout does not reach
        lambda: tiny_model("opt", ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=256),  # dropout=0.1
    ],
    ids=["llama-attention-dropout", "opt-functional-dropout"],
)
def test_refuses_randomness_in_training_mode_that_the_prompt_would_share(build):
    # A packed row draws one dropout mask for the prompt of chosen and rejected, stock draws two: another loss
    # distribution. Refused when required; the automatic mode (REDI's default) runs the stock forward instead.
    with pytest.raises(ValueError, match=r"random in training mode \((attention_dropout|dropout)=0.1\).*" + FALLBACK):
        sgd_step(True, build())
    redi = sgd_step(False, build(), config=REDIConfig, trainer_cls=REDITrainer, prefix_sharing=None, train=False)[0]
    assert redi._prefix_sharing_rule is None


def test_opt_near_its_position_table_with_padding_to_a_multiple():
    # OPT numbers positions from the mask: the packed rows must not look up the padded width's position, which the
    # stock forward never does (the longest row is 140 tokens, padded to 144, the table holds 140 + OPT's offset 2)
    def opt():
        # (no biases: the key bias has an analytically zero gradient, whose rounding a relative measure cannot judge)
        return tiny_model(
            "opt", ffn_dim=64, word_embed_proj_dim=32, dropout=0.0, enable_bias=False, max_position_embeddings=140
        )

    compare(opt, ref=True, pad_to_multiple_of=8)


def test_eval_logs_the_packed_share_under_an_eval_key():
    trainer, _ = sgd_step(True, llama(), train=False)
    metrics = trainer.evaluate(long_prompts(4, seed=2))
    assert metrics["eval_prefix_sharing/packed_forwards"] == 1.0 and "prefix_sharing/packed_forwards" not in metrics


@pytest.mark.parametrize("fmt", QUANTIZED_FORMATS)
def test_quantised_base_with_lora_matches_stock(fmt, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    trainers = {}
    for shared in (False, True):
        trainer, _ = sgd_step(shared, quantized_llama(fmt, tmp_path), peft_config=lora, train=False)
        fp32_adapters_(trainer)
        # The self-check's eval forwards leave the weights as loaded (bitsandbytes would repack 4-bit ones for a
        # kernel through which training gets no gradient)
        assert repacked_4bit_layers(trainer.model) == []
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        trainers[shared] = trainer
    assert trainers[True].state.log_history[0]["prefix_sharing/packed_forwards"] == 1.0
    assert update_difference(trainers[False], trainers[True], before) <= RTOL


def test_qlora_bf16_adapters_drift_no_more_than_stock(tmp_path):
    # TRL casts adapters on a quantised base to bf16 (as QLoRA does): both trainers then carry bf16 rounding
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)

    def gradient(shared, fp32):
        trainer, _ = sgd_step(shared, quantized_llama("bnb_4bit", tmp_path), peft_config=lora, train=False)
        assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.bfloat16}
        if fp32:
            fp32_adapters_(trainer)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.train()  # as Trainer.training_step does (an eval-mode forward would repack the stock model)
        trainer.model.zero_grad(set_to_none=True)
        trainer.compute_loss(trainer.model, batch).backward()
        return torch.cat([p.grad.flatten().double() for p in trainer.model.parameters() if p.requires_grad])

    reference = gradient(False, fp32=True)
    drift = {
        shared: ((gradient(shared, fp32=False) - reference).norm() / reference.norm()).item()
        for shared in (False, True)
    }
    print(f"QLoRA bf16-adapter gradient drift from fp32 adapters (relative norm), stock/shared: {drift}")
    assert drift[False] > 1e-4
    assert drift[True] <= 2 * drift[False], drift


def test_refuses_implicit_prompts_that_differ_with_the_row_index():
    def turns(question, answer):
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    chosen = [turns("Add 1 + 2.", "3") for _ in range(3)]
    rejected = [turns("Add 1 + 2.", "5"), turns("Add 1 + 2.", "4"), turns("Add 1 + 3.", "5")]
    data = Dataset.from_dict({"chosen": chosen, "rejected": rejected})
    # (the stock trainer takes their common start, no message at all for row 2, as the prompt, and fails later)
    with pytest.raises(ValueError, match=r"train_dataset row 2: the chosen and rejected conversations differ"):
        sgd_step(True, llama(), data)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match=r"prefix_sharing_min_prompt_ratio=-1.*>= 0"):
        PrefixSharingDPOConfig("out", use_cpu=True, prefix_sharing_min_prompt_ratio=-1)
    with pytest.raises(ValueError, match=r"prefix_sharing='yes' must be True, False or None"):
        REDIConfig("out", use_cpu=True, prefix_sharing="yes")


# ------------------------------------------------------------------ two processes


def test_two_processes_match_the_stock_trainer(tmp_path):
    script = __file__.replace("test_prefix_sharing_trainer.py", "_prefix_sharing_distributed.py")
    for mode in ("stock", "shared"):
        run_distributed(script, str(tmp_path / mode / "w.safetensors"), mode, nproc=2)
    stock, shared = load_file(tmp_path / "stock" / "w.safetensors"), load_file(tmp_path / "shared" / "w.safetensors")
    base = load_file(tmp_path / "stock" / "before.safetensors")
    assert shared["packed"].item() == 1.0 and stock["loss"].item() == pytest.approx(shared["loss"].item(), rel=1e-5)
    assert max_update_difference(stock, shared, base) <= RTOL
