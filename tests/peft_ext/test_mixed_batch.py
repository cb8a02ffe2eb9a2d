"""Mixed-adapter batches (``adapter_names``) for MoRA and SUBNET against per-adapter forwards."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from peft_ext import MoraConfig, SubnetConfig
from peft_ext._mixed_batch import generation_expand_size, sub_batches

ROWS = ["math", "__base__", "code", "math", "code"]


def make_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def make_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return AutoModelForCausalLM.from_config(config).eval()


def mora(targets, seed):
    return MoraConfig(r=4, target_modules=targets, init_weights=False, mora_type=["sharing", "rotation"][seed % 2])


def subnet(targets, seed):
    return SubnetConfig(target_modules=targets, density=0.3, seed=seed, init_weights=False)


CASES = {
    "mora-llama": (make_llama, mora, ["q_proj", "v_proj", "down_proj"]),
    "mora-gpt2": (make_gpt2, mora, ["c_attn", "c_proj"]),
    "subnet-llama": (make_llama, subnet, ["q_proj", "v_proj", "down_proj", "embed_tokens"]),
    "subnet-gpt2": (make_gpt2, subnet, ["c_attn", "c_fc"]),
}


@pytest.fixture(params=list(CASES))
def two_adapters(request):
    make_base, make_config, targets = CASES[request.param]
    model = get_peft_model(make_base(), make_config(targets, 0), adapter_name="math")
    model.add_adapter("code", make_config(targets, 1))
    if request.param.startswith("mora"):  # M is random (init_weights=False) but small; make the two adapters matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "mora_M" in name:
                    p.mul_(20)
    return model.eval()


def per_adapter_logits(model, input_ids):
    out = torch.empty(*input_ids.shape, model.config.vocab_size)
    for i, name in enumerate(ROWS):
        if name == "__base__":
            with model.disable_adapter():
                out[i] = model(input_ids[i : i + 1]).logits[0]
        else:
            model.set_adapter(name)
            out[i] = model(input_ids[i : i + 1]).logits[0]
    return out


def test_sub_batches_keeps_rows_per_name():
    groups = sub_batches(["a", "b", "a"])
    assert list(groups) == ["a", "b"] and groups["a"].tolist() == [0, 2] and groups["b"].tolist() == [1]
    assert generation_expand_size({"num_beams": 3, "num_return_sequences": 2}) == 3
    assert generation_expand_size({}) == 1


def test_forward_matches_per_adapter_forwards(two_adapters):
    model = two_adapters
    input_ids = torch.randint(0, 64, (len(ROWS), 7), generator=torch.Generator().manual_seed(1))
    expected = per_adapter_logits(model, input_ids)
    model.set_adapter("math")
    mixed = model(input_ids, adapter_names=ROWS).logits
    # the adapters differ from each other and from the base, so a silently ignored argument fails
    assert (expected[0] - expected[2]).abs().max() > 1e-2 and (expected[0] - expected[1]).abs().max() > 1e-2
    print(f"forward: max |mixed - per-adapter| = {(mixed - expected).abs().max():.2e}")
    torch.testing.assert_close(mixed, expected, rtol=0, atol=1e-6)
    # calling the tuner directly routes the argument too
    torch.testing.assert_close(model.base_model(input_ids, adapter_names=ROWS).logits, expected, rtol=0, atol=1e-6)


def test_generate_matches_per_adapter_generate(two_adapters):
    model = two_adapters
    input_ids = torch.randint(1, 64, (len(ROWS), 4), generator=torch.Generator().manual_seed(2))
    kwargs = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "output_scores": True}
    kwargs["return_dict_in_generate"] = True
    expected_tokens, expected_scores = [], []
    for i, name in enumerate(ROWS):
        if name == "__base__":
            with model.disable_adapter():
                out = model.generate(input_ids=input_ids[i : i + 1], **kwargs)
        else:
            model.set_adapter(name)
            out = model.generate(input_ids=input_ids[i : i + 1], **kwargs)
        expected_tokens.append(out.sequences[0])
        expected_scores.append(torch.stack([s[0] for s in out.scores]))
    model.set_adapter("math")
    mixed = model.generate(input_ids=input_ids, adapter_names=ROWS, **kwargs)
    assert torch.equal(mixed.sequences, torch.stack(expected_tokens))
    scores = torch.stack([torch.stack([s[i] for s in mixed.scores]) for i in range(len(ROWS))])
    finite = torch.isfinite(scores)  # min_new_tokens masks EOS with -inf
    print(
        f"generate: max |mixed - per-adapter| scores = {(scores - torch.stack(expected_scores))[finite].abs().max():.2e}"
    )
    torch.testing.assert_close(scores, torch.stack(expected_scores), rtol=0, atol=1e-6)


def test_paths_that_cannot_mix_adapters_refuse(two_adapters):
    model = two_adapters
    input_ids = torch.randint(0, 64, (len(ROWS), 5))
    with pytest.raises(ValueError, match="no .* layer of this model has"):
        model(input_ids, adapter_names=["math", "typo", "code", "math", "code"])
    with pytest.raises(ValueError, match="5 rows"):
        model(input_ids, adapter_names=["math", "code"])
    with pytest.raises(TypeError, match="list of adapter names"):
        model(input_ids, adapter_names="math")
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(input_ids, adapter_names=ROWS)
    model.eval()
    model.merge_adapter(["math"])
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model(input_ids, adapter_names=ROWS)
    model.unmerge_adapter()
    # beam search repeats each prompt; the names are repeated with it
    beams = model.generate(
        input_ids=input_ids[:2], adapter_names=ROWS[:2], num_beams=2, max_new_tokens=2, pad_token_id=0
    )
    assert beams.shape == (2, 7)
