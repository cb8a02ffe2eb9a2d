"""MoRA on quantised bases (bitsandbytes 4-bit and 8-bit, torchao int8 weight-only); SUBNET refuses them.

The reference for a quantised model is a float model whose weights are the dequantised weights, with
the same MoRA matrices; merging is compared with PEFT's LoRA merge on the same base.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, TorchAoConfig

from peft_ext import MoraConfig, SubnetConfig
from peft_ext._quantized import dense_weight, keep_4bit_training_layout, quantization_format, repacked_4bit_layers

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def quantization(backend: str):
    if backend == "torchao_int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(quant_type=Int8WeightOnlyConfig())
    if backend == "bnb_8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    quant_type = backend.removeprefix("bnb_4bit_")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type.removesuffix("_dq"),
        bnb_4bit_use_double_quant=quant_type.endswith("_dq"),
        bnb_4bit_compute_dtype=torch.float32,
    )


BACKENDS = ["bnb_4bit_nf4_dq", "bnb_4bit_fp4", "bnb_8bit", "torchao_int8"]


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    path = tmp_path_factory.mktemp("toy")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def load(path, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quantization(backend), device_map="cpu", dtype=torch.float32
        )


def dequantized_copy(path, quantized):
    """A float model whose every quantised weight is the dequantised weight of ``quantized``."""
    ref = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    modules = dict(ref.named_modules())
    for name, module in quantized.named_modules():
        if quantization_format(module) is not None:
            modules[name].weight.data = dense_weight(module).detach().float().clone()
    return ref


def mora_config():
    return MoraConfig(r=4, target_modules=TARGETS, init_weights=False, mora_type="sharing")


def randomize_m(model, seed=0, scale=20.0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mora_M" in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen) / p.shape[0])


def match_update_norms(lora, mora):
    """Scale each LoRA B so that its layer's update has the Frobenius norm of the MoRA update there."""
    mora_layers = dict(mora.named_modules())
    with torch.no_grad():
        for name, module in lora.named_modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                target = mora_layers[name].get_delta_weight("default").norm()
                module.lora_B["default"].weight.mul_(target / module.get_delta_weight("default").norm())


def logits(model, ids):
    # Train mode (no dropout in these models), the mode the adapters train in.
    model.train()
    with torch.no_grad():
        return model(ids).logits.float()


def eval_logits(model, ids, disable=None):
    model.eval()
    with torch.no_grad():
        if disable is None:
            return model(ids).logits.float()
        with disable.disable_adapter():
            return model(ids).logits.float()


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_equals_dequantized_reference_and_merge_is_as_good_as_loras(toy_dir, backend):
    base = load(toy_dir, backend)
    ref = dequantized_copy(toy_dir, base)
    ref_base = logits(ref, IDS)
    base_err = rel(logits(base, IDS), ref_base)  # the backend's own error (LLM.int8: activations)
    model = get_peft_model(base, mora_config())
    randomize_m(model)
    ref_model = get_peft_model(ref, mora_config())
    randomize_m(ref_model)
    out = logits(model, IDS)
    err = rel(out, logits(ref_model, IDS))
    assert rel(out, ref_base) > 1e-2  # the adapter changes the output
    print(f"{backend}: forward error vs dequantized reference {err:.2e} (base alone {base_err:.2e})")
    assert err <= 1e-3, err
    # Eval mode: LLM.int8 quantises activations, bitsandbytes' CPU 4-bit kernel computes in bf16. That error is
    # the backend's own (measured and printed); per layer, the adapter adds nothing to it.
    eval_base_err = rel(eval_logits(model, IDS, disable=model), eval_logits(ref_model, IDS, disable=ref_model))
    eval_err = rel(eval_logits(model, IDS), eval_logits(ref_model, IDS))
    print(f"{backend}: eval-mode error {eval_err:.2e} (base alone {eval_base_err:.2e})")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    ref_layer = ref_model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    with torch.no_grad():
        backend_err = layer.base_layer(x) - ref_layer.base_layer(x)
        torch.testing.assert_close(layer(x) - ref_layer(x), backend_err, rtol=0, atol=1e-5)
        expected = layer.base_layer(x) + layer._adapter_delta("default", x)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)

    # merge: dequantise, add, quantise again; compare with PEFT's LoRA on the same base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
        mora_merge_err = rel(logits(model, IDS), out)
        assert quantization_format(layer.get_base_layer()) == quantization_format(layer.base_layer) is not None
        merged_out = logits(model, IDS)
        model.unmerge_adapter()
        assert rel(logits(model, IDS), out) < 5 * mora_merge_err + 1e-6
        lora = get_peft_model(load(toy_dir, backend), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
        match_update_norms(lora, model)  # requantisation error grows with the update; compare like with like
        lora_out = logits(lora, IDS)
        lora.merge_adapter()
        lora_merge_err = rel(logits(lora, IDS), lora_out)
    print(f"{backend}: merge error MoRA {mora_merge_err:.2e}, LoRA {lora_merge_err:.2e}")
    assert mora_merge_err <= 2 * lora_merge_err, (mora_merge_err, lora_merge_err)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unloaded = model.merge_and_unload()
    q_proj = unloaded.model.layers[0].self_attn.q_proj
    assert quantization_format(q_proj) is not None and not hasattr(q_proj, "mora_M")
    assert rel(logits(unloaded, IDS), merged_out) < 5 * mora_merge_err + 1e-6


@pytest.mark.parametrize("backend", ["bnb_4bit_nf4_dq", "torchao_int8"])
def test_training_reaches_only_m_and_the_loss_falls_and_saved_adapters_load(toy_dir, backend, tmp_path):
    base = prepare_model_for_kbit_training(load(toy_dir, backend), use_gradient_checkpointing=False)
    model = get_peft_model(base, MoraConfig(r=4, target_modules=TARGETS)).train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("mora_M" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(6):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        grads = [n for n, p in model.named_parameters() if p.grad is not None]
        assert grads and all("mora_M" in n for n in grads)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    print(f"{backend}: training loss {[round(x, 3) for x in losses]}")
    assert losses[-1] < losses[0] - 0.05, losses
    out = logits(model, IDS)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(load(toy_dir, backend), tmp_path)
    torch.testing.assert_close(logits(loaded, IDS), out, rtol=0, atol=1e-5)


def test_unsupported_quantised_layers_are_refused(toy_dir):
    base = load(toy_dir, "bnb_4bit_nf4_dq")
    before = copy.deepcopy(base.model.layers[0].self_attn.q_proj.weight.data)
    with pytest.raises(TypeError, match="SUBNET cannot adapt .*Linear4bit.*float weights only"):
        get_peft_model(base, SubnetConfig(target_modules=["q_proj"], density=0.1))
    assert torch.equal(base.model.layers[0].self_attn.q_proj.weight.data, before)

    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    net = nn.Sequential(nn.Linear(32, 32))
    quantize_(net, Int8DynamicActivationInt8WeightConfig())
    with pytest.raises(TypeError, match="MoRA cannot adapt '0'.*Linear .*Int8Tensor.*supports .*Linear4bit"):
        get_peft_model(net, MoraConfig(r=2, target_modules=["0"]))


@pytest.mark.parametrize("saved", [False, True], ids=["repacked", "saved-after-repacking"])
@pytest.mark.parametrize("backend", ["bnb_4bit_nf4_dq", "bnb_4bit_fp4"])
def test_unpacking_a_repacked_4bit_layer(toy_dir, backend, saved):
    """bitsandbytes repacks 4-bit weights for its bf16 CPU kernel on an eval forward (on CPUs with AVX512-BF16),
    rounding their block scales to bf16; saving (``state_dict``) undoes the repacking with a private inverse that
    leaves the scales of weights without double quantisation transposed. Either way every layer dequantises to the
    weight it was loaded with, to that rounding (down_proj has two blocks per row, where a transposed layout would
    show), and MoRA refuses to adapt such a base, as training would start from other weights."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    base = load(toy_dir, backend)
    loaded = {name: dense_weight(m).clone() for name, m in base.named_modules() if quantization_format(m)}
    base.eval()
    with torch.no_grad():
        base(IDS)
    if saved:
        base.state_dict()
    assert len(repacked_4bit_layers(base)) == len(loaded) == 14
    with pytest.raises(ValueError, match=r"repacked the weights of 14 4-bit layer\(s\).*Reload the model"):
        get_peft_model(base, mora_config())
    # bf16 scales: 2^-8 relative at most; with double quantisation, bitsandbytes quantises them to 8 bits again
    rtol = 2**-6 if backend.endswith("_dq") else 2**-8
    for name, module in base.named_modules():
        if name in loaded:  # dense_weight unpacks first
            torch.testing.assert_close(dense_weight(module), loaded[name], rtol=rtol, atol=0, msg=name)
    assert len(repacked_4bit_layers(base)) == 14  # unpacked, but the scales stay rounded


def test_mora_on_a_repacked_base_changes_nothing_before_refusing(toy_dir):
    # q_proj is left unquantised, so the first target MoRA reaches is a float layer: still nothing is replaced
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["q_proj", "lm_head"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(toy_dir, quantization_config=quantization, dtype=torch.float32)
    base.eval()
    with torch.no_grad():
        base(IDS)
    modules = [(name, type(module)) for name, module in base.named_modules()]
    with pytest.raises(ValueError, match=r"repacked the weights of 12 4-bit layer\(s\)"):
        get_peft_model(base, mora_config())
    assert [(name, type(module)) for name, module in base.named_modules()] == modules


@pytest.mark.parametrize("backend", ["bnb_4bit_nf4_dq", "bnb_8bit"])
def test_mixed_adapter_batch_on_a_quantised_base_with_gradients_enabled(toy_dir, backend):
    # bitsandbytes may return a view made under no_grad: each adapter's rows must not be written into it
    model = get_peft_model(load(toy_dir, backend), mora_config(), adapter_name="a")
    model.add_adapter("b", mora_config())
    randomize_m(model, seed=3)
    model.eval()
    ids = torch.randint(0, 96, (3, 6), generator=torch.Generator().manual_seed(1))
    model(ids, adapter_names=["a", "__base__", "b"])  # gradients on, as in an eval loop without no_grad
    # One layer against the same batch through one adapter at a time: LLM.int8 picks outlier columns over the
    # batch, so only the same layer input gives the same base output
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 6, 64, generator=torch.Generator().manual_seed(2))
    mixed = layer(x, adapter_names=["a", "__base__", "b"])
    model.set_adapter("a")
    only_a = layer(x)
    with model.disable_adapter():
        base = layer(x)
    model.set_adapter("b")
    only_b = layer(x)
    torch.testing.assert_close(mixed, torch.stack([only_a[0], base[1], only_b[2]]), atol=1e-6, rtol=1e-6)
    assert (only_a[0] - base[0]).abs().max() > 1e-2  # the adapters really change the rows they serve
    assert repacked_4bit_layers(model) == []  # MoRA keeps 4-bit layers in their training layout in eval mode


def _input_gradient(model, ids):
    """Gradient of the logits' sum with respect to the input embeddings, in training mode."""
    model.train()
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=embeds).logits.sum().backward()
    return embeds.grad


def test_eval_forwards_keep_the_4bit_layout_that_training_uses(toy_dir):
    from bitsandbytes.functional import has_avx512bf16

    reference = _input_gradient(load(toy_dir, "bnb_4bit_nf4_dq"), IDS)  # never evaluated
    assert reference.abs().max() > 0

    if has_avx512bf16():  # the upstream behaviour this guards against, where bitsandbytes repacks on CPU
        bare = load(toy_dir, "bnb_4bit_nf4_dq")
        bare.eval()
        with torch.no_grad():
            bare(IDS)
        assert repacked_4bit_layers(bare)
        # Only the residual stream carries gradient back: none passes through the repacked layers' kernel
        assert rel(_input_gradient(bare, IDS), reference) > 0.1
        with pytest.raises(ValueError, match=r"repacked the weights of 14 4-bit layer\(s\).*no longer the weights"):
            keep_4bit_training_layout(bare)

    model = load(toy_dir, "bnb_4bit_nf4_dq")
    assert keep_4bit_training_layout(model) == keep_4bit_training_layout(model) == 14  # idempotent
    model.eval()
    with torch.no_grad():
        model(IDS)
    assert repacked_4bit_layers(model) == []
    assert not any(module.training for module in model.modules())  # each layer's eval mode is given back
    torch.testing.assert_close(_input_gradient(model, IDS), reference, rtol=0, atol=0)
