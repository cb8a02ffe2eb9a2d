"""Each private upstream touch point in ``trl_ext._compat`` exists and behaves as assumed on the installed versions.

The references are independent of the upstream code: explicit softmax attention, plain ``log_softmax`` of the
logits, and the documented public behaviour around each private name.
"""

import inspect
import os
import socket
import subprocess
import sys

import pytest
import torch
import trl.trainer.dpo_trainer as dpo_module
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments
from transformers.integrations.sdpa_attention import repeat_kv
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig

from peft_trl_testbed import make_arithmetic_dataset, make_reasoning_preferences, toy_args, toy_model_path
from trl_ext import _compat

MODEL = dict(arch="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


class _ReferenceFreeDPO(DPOTrainer):
    ref_model = _compat.reference_free_ref_model("_ReferenceFreeDPO")


def _from_config():
    """A model with no path to load a reference (or a tokenizer) from, and its tokenizer."""
    path = toy_model_path(**MODEL)
    model = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(path).config)
    model.config.name_or_path = ""
    return model, AutoTokenizer.from_pretrained(path)


# ------------------------------------------------------------------------------------------- TRL: DPOTrainer


def test_dpo_records_whether_the_data_has_images(tmp_path):
    args = toy_args(DPOConfig, tmp_path, per_device_train_batch_size=2, max_steps=1)
    model, tokenizer = _from_config()
    trainer = _ReferenceFreeDPO(
        model=model,
        ref_model=_compat.NO_REFERENCE_MODEL,
        args=args,
        train_dataset=make_reasoning_preferences(4),
        processing_class=tokenizer,
    )
    assert _compat.dpo_vision_dataset(trainer) is False


def test_dpo_builds_no_reference_for_a_given_one(tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr(dpo_module, "create_model_from_path", lambda path, **kw: loads.append(path))
    args = toy_args(DPOConfig, tmp_path, per_device_train_batch_size=2, max_steps=1)
    data = make_reasoning_preferences(4)
    model, tokenizer = _from_config()
    trainer = _ReferenceFreeDPO(
        model=model, ref_model=_compat.NO_REFERENCE_MODEL, args=args, train_dataset=data, processing_class=tokenizer
    )
    assert loads == [] and trainer.ref_model is None
    assert not hasattr(trainer.model, "peft_config")
    # A PEFT model with a pretrained adapter gets no frozen "ref" copy of it.
    model, tokenizer = _from_config()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    trainer = _ReferenceFreeDPO(
        model=peft_model,
        ref_model=_compat.NO_REFERENCE_MODEL,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
    )
    assert set(trainer.model.peft_config) == {"default"} and trainer.ref_model is None
    # Stock DPO, for contrast: the same PEFT model without a ref_model argument gets the "ref" adapter.
    model, tokenizer = _from_config()
    stock = DPOTrainer(
        model=get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
    )
    assert set(stock.model.peft_config) == {"default", "ref"}
    with pytest.raises(ValueError, match="reference-free.*Linear"):
        trainer.ref_model = torch.nn.Linear(1, 1)

    # The metric store: DPOTrainer.log logs each key's mean and clears it; the token count and TP size exist.
    _compat.dpo_metrics(trainer, "train")["probe"] += [1.0, 3.0]
    trainer.model.train()
    trainer.log({})
    assert trainer.state.log_history[-1]["probe"] == 2.0
    assert "probe" not in _compat.dpo_metrics(trainer, "train")
    assert trainer._total_train_tokens == 0 and trainer._tp_size == 1


# ------------------------------------------------------------------------------------------ TRL: GRPOTrainer


def test_grpo_log_prob_hook_has_the_overridden_signature():
    hook = getattr(GRPOTrainer, _compat.GRPO_LOGPS_HOOK)
    parameters = list(inspect.signature(hook).parameters.values())
    names = tuple(p.name for p in parameters)
    leading = len(_compat.GRPO_LOGPS_HOOK_PARAMETERS)
    assert names[:leading] == _compat.GRPO_LOGPS_HOOK_PARAMETERS
    defaulted = parameters[leading : leading + len(_compat.GRPO_LOGPS_HOOK_DEFAULTS)]
    assert {p.name: p.default for p in defaulted} == _compat.GRPO_LOGPS_HOOK_DEFAULTS
    rest = parameters[leading + len(defaulted) :]
    assert all(p.default is None for p in rest), [p.name for p in rest]  # multimodal inputs, None when text-only


def test_grpo_stock_log_probs_and_tokenizer(tmp_path):
    args = toy_args(GRPOConfig, tmp_path, per_device_train_batch_size=2, num_generations=2, max_completion_length=4)
    tokenizer = AutoTokenizer.from_pretrained(toy_model_path(**MODEL))
    trainer = GRPOTrainer(
        model=toy_model_path(**MODEL),
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=make_arithmetic_dataset(2),
        processing_class=tokenizer,
    )
    assert _compat.grpo_tokenizer(trainer) is tokenizer and tokenizer.pad_token_id is not None
    torch.manual_seed(0)
    input_ids = torch.randint(3, len(tokenizer), (2, 7))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # left padding
    trainer.model.eval()
    with torch.no_grad():
        logps = _compat.stock_grpo_logps(trainer, trainer.model, input_ids, attention_mask, 3, batch_size=2)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = trainer.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    expected = torch.log_softmax(logits[:, -4:-1].float(), -1).gather(-1, input_ids[:, -3:, None])[..., 0]
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ transformers


def test_attn_implementation_follows_set_attn_implementation():
    model = AutoModelForCausalLM.from_pretrained(toy_model_path(**MODEL), attn_implementation="sdpa")
    assert _compat.attn_implementation(model.config) == "sdpa"
    model.set_attn_implementation("eager")
    assert _compat.attn_implementation(model.config) == "eager"


def test_to_dict_masks_tokens(tmp_path):
    args = SFTConfig(output_dir=str(tmp_path), bf16=False, hub_token="secret", eos_token="<|end|>")
    values = args.to_dict()
    assert (values["hub_token"], values["eos_token"]) == ("<HUB_TOKEN>", "<EOS_TOKEN>")
    unmasked = _compat.unmask_tokens(values, args)
    assert (unmasked["hub_token"], unmasked["eos_token"]) == ("secret", "<|end|>")
    assert values["hub_token"] == "<HUB_TOKEN>"  # the input is left as it was
    plain = TrainingArguments(output_dir=str(tmp_path), hub_token=None)
    assert _compat.unmask_tokens(plain.to_dict(), plain)["hub_token"] is None


# ------------------------------------------------------------------------------------------------------- torch


def _explicit_attention(q, k, v, scale, allowed):
    """Softmax attention with explicit scores; GQA by repeating the key/value heads. Returns (out, logsumexp)."""
    rep = q.size(1) // k.size(1)
    scores = (q @ repeat_kv(k, rep).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ repeat_kv(v, rep), scores.logsumexp(-1)


def _qkv(queries, keys, heads=4, kv_heads=2, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, queries, dim, generator=generator)
    k = torch.randn(2, kv_heads, keys, dim, generator=generator)
    v = torch.randn(2, kv_heads, keys, dim, generator=generator)
    return q, k, v


def test_cpu_flash_attention_forward():
    scale = 0.3
    q, k, v = _qkv(6, 6)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()  # top-left aligned
    out, lse = _compat.cpu_flash_attention(q, k, v, 0.0, True, scale=scale)
    expected_out, expected_lse = _explicit_attention(q, k, v, scale, causal)
    assert out.shape == (2, 4, 6, 8) and lse.shape == (2, 4, 6) and lse.dtype == torch.float32
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)
    # An additive float mask, more keys than queries
    q, k, v = _qkv(3, 5, seed=1)
    allowed = torch.rand(3, 5, generator=torch.Generator().manual_seed(2)) > 0.3
    allowed[:, 0] = True
    mask = torch.zeros(3, 5).masked_fill(~allowed, float("-inf"))
    out, lse = _compat.cpu_flash_attention(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
    expected_out, expected_lse = _explicit_attention(q, k, v, scale, allowed)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)


def test_cpu_flash_attention_backward_uses_the_given_logsumexp():
    """Queries attend to two key sets A and B in separate calls, merged through their log-sum-exp; each part's
    backward, given the merged output and log-sum-exp, yields its share of the joint softmax's exact gradient."""
    scale = 0.3
    q, k, v = _qkv(4, 7, seed=3)
    grad_out = torch.randn(2, 4, 4, 8, generator=torch.Generator().manual_seed(4))
    parts = (slice(0, 3), slice(3, 7))
    outs, lses = zip(*(_compat.cpu_flash_attention(q, k[:, :, s], v[:, :, s], 0.0, False, scale=scale) for s in parts))
    lse = torch.logaddexp(*lses)
    out = sum(o * (part_lse - lse).exp()[..., None] for o, part_lse in zip(outs, lses))
    grads = [
        _compat.cpu_flash_attention_backward(
            grad_out, q, k[:, :, s].contiguous(), v[:, :, s].contiguous(), out, lse, 0.0, False, scale=scale
        )
        for s in parts
    ]
    reference = [x.clone().requires_grad_() for x in (q, k, v)]
    joint, joint_lse = _explicit_attention(*reference, scale, torch.ones(4, 7, dtype=torch.bool))
    torch.testing.assert_close(out, joint.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, joint_lse.detach(), rtol=1e-5, atol=1e-5)
    (joint * grad_out).sum().backward()
    expected_q, expected_k, expected_v = (x.grad for x in reference)
    torch.testing.assert_close(grads[0][0] + grads[1][0], expected_q, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([grads[0][1], grads[1][1]], dim=2), expected_k, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([grads[0][2], grads[1][2]], dim=2), expected_v, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------- DeepSpeed

_ZERO3_PROBE = """
import os, sys
import torch, deepspeed
from trl_ext._compat import zero3_full_shape, zero3_partitioned
deepspeed.init_distributed(dist_backend="gloo")
with deepspeed.zero.Init(config_dict_or_path={"zero_optimization": {"stage": 3}, "train_batch_size": 1}):
    layer = torch.nn.Linear(3, 5)
ordinary = torch.nn.Linear(3, 5).weight
print(tuple(zero3_full_shape(layer.weight)), layer.weight.numel(), zero3_partitioned(layer.weight),
      zero3_partitioned(ordinary), zero3_full_shape(ordinary), zero3_full_shape(None))
"""


def test_zero3_parameter_attributes():
    """A one-process ZeRO-3 ``zero.Init`` on CPU (gloo), in a subprocess so no process group leaks into the tests."""
    pytest.importorskip("deepspeed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0"}
    env["WORLD_SIZE"] = "1"
    result = subprocess.run([sys.executable, "-c", _ZERO3_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "(5, 3) 0 True False None None"
