"""TRL's vLLM weight sync on MoRA and SUBNET models: it pushes ``merge_and_unload()``'s weights, then unmerges.

GRPO with vLLM merges the PEFT adapters, reads every weight under the base model's names and unmerges
(``VLLMGeneration._iter_named_params``, run here without a server through ``vllm_helpers``). One process
here; under DeepSpeed ZeRO-3, where TRL gathers the partitioned weights first, in ``test_engines.py``.
"""

import copy

import pytest
import torch
from accelerate import Accelerator
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from vllm_helpers import pushed_weights

from peft_ext import MoraConfig, SubnetConfig
from peft_ext.subnet.layer import SubnetLayer
from peft_trl_testbed import build_toy_model

TARGETS = {"llama": ["q_proj", "v_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_proj", "c_fc"]}


def _model(arch, tuner):
    base = build_toy_model(arch=arch, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    if tuner == "mora":
        config = MoraConfig(r=2, target_modules=TARGETS[arch], init_weights=False)
    else:
        config = SubnetConfig(target_modules=TARGETS[arch], density=0.1, init_weights=False)
    with torch.no_grad():  # make the update large enough that a missed merge shows
        model = get_peft_model(base, config)
        for param in model.parameters():
            if param.requires_grad:
                param.mul_(5.0)
    return model.eval()  # GPT-2's dropout would make two forwards differ


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("tuner", ["mora", "subnet"])
def test_pushed_weights_are_merge_and_unload_then_unmerged(arch, tuner):
    model = _model(arch, tuner)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(5, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    expected = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    unadapted = dict(copy.deepcopy(model).unload().named_parameters())
    adapted = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]

    pushed = pushed_weights(model, Accelerator(cpu=True))

    assert set(pushed) == set(expected), sorted(set(pushed) ^ set(expected))[:5]
    for name, tensor in pushed.items():
        torch.testing.assert_close(tensor, expected[name].detach(), rtol=0, atol=0, msg=name)
    changed = [n for n, tensor in pushed.items() if not torch.equal(tensor, unadapted[n])]
    assert len(changed) == len(adapted) > 0, (changed, adapted)  # every adapted weight was pushed merged
    # Unmerged afterwards: no layer merged, the base weights as before, the same outputs.
    assert not any(getattr(m, "merged", False) for m in model.modules())
    for name, param in model.named_parameters():
        exact = tuner == "subnet" or param.requires_grad  # MoRA unmerges by subtracting the delta again
        tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(param.detach(), before[name], **tol, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)
    if tuner == "subnet":
        assert all(not layer._merge_backup for layer in model.modules() if isinstance(layer, SubnetLayer))
