"""REDI: loss against the closed form, alpha=0 against SFT, no reference model, data tooling, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
import trl.trainer.dpo_trainer as dpo_module
from datasets import Dataset
from distributed_helpers import run_distributed
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_ext import MoraConfig
from peft_trl_testbed import (
    check_reasoning_answer,
    make_reasoning_preferences,
    make_reasoning_traces,
    pretrained_toy_model_path,
    toy_args,
)
from trl_ext import REDIConfig, REDITrainer
from trl_ext.redi import build_redi_pairs, label_traces, math_verify_checker, positives, redi_loss


def _trainer(tmp_path, alpha=0.8, model=None, dataset=None, **kw):
    kw = {"per_device_train_batch_size": 4, "max_steps": 1, **kw}
    args = toy_args(REDIConfig, tmp_path, redi_alpha=alpha, **kw)
    model = model if model is not None else AutoModelForCausalLM.from_pretrained(pretrained_toy_model_path())
    return REDITrainer(model=model, args=args, train_dataset=dataset or make_reasoning_preferences(8, seed=1))


def _closed_form_parts(model, batch):
    """Per-sequence completion log-prob sums and lengths from plain logits (no fused head)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["input_ids"][:, 1:]
    token_logps = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = batch["completion_mask"][:, 1:].float()
    return (token_logps * mask).sum(-1), mask.sum(-1)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0])
def test_loss_equals_closed_form_on_trainer_batch(alpha, tmp_path):
    trainer = _trainer(tmp_path, alpha=alpha)
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    loss = trainer.compute_loss(model, batch)
    logps, lengths = _closed_form_parts(model, batch)
    n = logps.shape[0] // 2
    expected = sum(
        -logps[i] / lengths[i] + alpha * logps[n + i] / lengths[n + i] for i in range(n)
    ) / n  # fmt: skip
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_alpha_zero_gradient_is_length_normalised_sft(tmp_path):
    trainer = _trainer(tmp_path, alpha=0.0)
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    trainer.compute_loss(model, batch).backward()
    redi_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # Independent SFT reference: mean over chosen sequences of the mean NLL of their completion tokens.
    n = batch["input_ids"].shape[0] // 2
    ids, att, cmask = batch["input_ids"][:n], batch["attention_mask"][:n], batch["completion_mask"][:n]
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
    labels = ids[:, 1:].masked_fill(cmask[:, 1:] == 0, -100)
    nll = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    sft = (nll.sum(-1) / (labels != -100).sum(-1)).mean()
    sft.backward()
    assert redi_grads
    for name, p in model.named_parameters():
        # Rounding only: differences far below the gradient's own scale, whatever the float path.
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(redi_grads[name], p.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_redi_loss_function_closed_form():
    loss, c, r = redi_loss(torch.tensor([-4.0, -6.0]), torch.tensor([-9.0, -2.0]), torch.tensor([2.0, 3.0]),
                           torch.tensor([3.0, 0.0]), alpha=0.5)  # fmt: skip
    # second rejected length 0 is clamped to 1
    assert torch.allclose(loss, torch.tensor(((2.0 + 0.5 * -3.0) + (2.0 + 0.5 * -2.0)) / 2))  # 0.75
    assert torch.equal(r, torch.tensor([-3.0, -2.0]))


def test_no_reference_model_is_created_or_loaded(tmp_path, monkeypatch):
    loads = []
    original = dpo_module.create_model_from_path

    def counting(path, **kw):
        loads.append(path)
        return original(path, **kw)

    monkeypatch.setattr(dpo_module, "create_model_from_path", counting)
    args = toy_args(REDIConfig, tmp_path, per_device_train_batch_size=4, max_steps=1)
    trainer = REDITrainer(model=pretrained_toy_model_path(), args=args, train_dataset=make_reasoning_preferences(8))
    assert trainer.ref_model is None
    assert len(loads) == 1  # the policy only
    trainer.train()
    assert dpo_module.create_model_from_path is counting  # restored
    instance_loads = len(loads)
    _trainer(tmp_path)
    assert len(loads) == instance_loads  # a model instance loads nothing


@pytest.mark.parametrize(
    "peft_config, trained_prefix",
    [
        (LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "lora_"),
        (MoraConfig(r=4, mora_type="rotation", target_modules=["q_proj", "v_proj"]), "mora_"),
    ],
    ids=["lora", "mora"],
)
def test_trains_peft_adapter_and_keeps_no_reference_adapter(peft_config, trained_prefix, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(pretrained_toy_model_path())
    model = get_peft_model(base, peft_config)
    trainer = _trainer(tmp_path, model=model, learning_rate=1e-2, max_steps=2)
    assert set(trainer.model.peft_config) == {"default"}
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert changed and all(trained_prefix in n for n in changed)


def test_conversational_preferences_work(tmp_path):
    plain = make_reasoning_preferences(8, seed=2)
    conv = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p in plain["prompt"]],
            "chosen": [[{"role": "assistant", "content": c}] for c in plain["chosen"]],
            "rejected": [[{"role": "assistant", "content": r}] for r in plain["rejected"]],
        }
    )
    trainer = _trainer(tmp_path, dataset=conv)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()  # metrics are logged under the mode the model is in
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
        logps, lengths = _closed_form_parts(trainer.model, batch)
    # Hand-computed from plain logits: mean per-token log-prob of each chosen and rejected completion.
    n = logps.shape[0] // 2
    chosen = [(logps[i] / lengths[i]).item() for i in range(n)]
    rejected = [(logps[n + i] / lengths[n + i]).item() for i in range(n)]
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for key in ("logps_norm/chosen", "logps_norm/rejected", "logps_norm/margin", "logps/chosen", "rewards/accuracies"):
        assert key in logged
    assert logged["logps_norm/chosen"] == pytest.approx(sum(chosen) / n, rel=1e-4)
    assert logged["logps_norm/rejected"] == pytest.approx(sum(rejected) / n, rel=1e-4)
    assert logged["logps_norm/margin"] == pytest.approx(sum(c - r for c, r in zip(chosen, rejected)) / n, rel=1e-4)
    trainer.train()  # the conversational format also trains end to end
    assert math.isfinite(trainer.state.log_history[0]["loss"])


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"missing the column\(s\) \['rejected'\]"):
        _trainer(tmp_path, dataset=Dataset.from_dict({"prompt": ["a"], "chosen": ["b"]}))
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match=f"redi_alpha={alpha}"):
            REDIConfig(output_dir=str(tmp_path), redi_alpha=alpha)
    with pytest.warns(UserWarning, match="collapse"):
        REDIConfig(output_dir=str(tmp_path), redi_alpha=0.95, bf16=False)
    with pytest.raises(ValueError, match="reference-free"):
        REDITrainer(model=pretrained_toy_model_path(), ref_model=pretrained_toy_model_path(),
                    args=toy_args(REDIConfig, tmp_path), train_dataset=make_reasoning_preferences(4))  # fmt: skip
    with pytest.raises(TypeError, match="takes a REDIConfig"):
        REDITrainer(model=pretrained_toy_model_path(), args={"output_dir": str(tmp_path)},
                    train_dataset=make_reasoning_preferences(4))  # fmt: skip


def _slow_pairs(rows):
    """Obvious reference: loop over prompts in order of appearance."""
    order, out, reasons = [], [], {}
    for r in rows:
        if r["prompt"] not in order:
            order.append(r["prompt"])
    for p in order:
        mine = [r for r in rows if r["prompt"] == p and 3 <= len(r["completion"]) <= 12]
        good = [r["completion"] for r in mine if r["correct"]]
        bad = [r["completion"] for r in mine if not r["correct"]]
        if not mine:
            reasons["all traces filtered by length"] = reasons.get("all traces filtered by length", 0) + 1
        elif not good:
            reasons["no correct trace"] = reasons.get("no correct trace", 0) + 1
        elif not bad:
            reasons["no incorrect trace"] = reasons.get("no incorrect trace", 0) + 1
        else:
            out.append((p, good[0], bad[0]))
    return out, reasons


def test_build_pairs_matches_slow_reference():
    rows = [
        {"prompt": "p1", "completion": "wrong1", "correct": False},
        {"prompt": "p1", "completion": "right1", "correct": True},
        {"prompt": "p1", "completion": "right2", "correct": True},
        {"prompt": "p2", "completion": "ok", "correct": True},  # too short
        {"prompt": "p2", "completion": "right-long-enough", "correct": True},  # too long
        {"prompt": "p3", "completion": "right3", "correct": True},
        {"prompt": "p4", "completion": "wrong4", "correct": False},
        {"prompt": "p5", "completion": "bad5", "correct": False},
        {"prompt": "p5", "completion": "good5", "correct": True},
    ]
    pairs, report = build_redi_pairs(Dataset.from_list(rows), min_length=3, max_length=12, keep_columns=())
    expected, reasons = _slow_pairs(rows)
    assert list(zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])) == expected
    assert dict(report.dropped) == reasons == {
        "all traces filtered by length": 1, "no incorrect trace": 1, "no correct trace": 1,
    }  # fmt: skip
    assert report.prompts == 5 and report.pairs == 2


def test_toy_traces_pairs_verify():
    traces = make_reasoning_traces(60, seed=3)
    relabelled = label_traces(traces.remove_columns("correct"), verifier=check_reasoning_answer)
    assert relabelled["correct"] == traces["correct"]
    pairs, report = build_redi_pairs(relabelled)
    assert report.pairs + sum(report.dropped.values()) == 60
    assert all(check_reasoning_answer(c, a) == 1.0 for c, a in zip(pairs["chosen"], pairs["answer"]))
    assert not any(check_reasoning_answer(r, a) == 1.0 for r, a in zip(pairs["rejected"], pairs["answer"]))
    sft = positives(relabelled)
    assert "correct" not in sft.column_names
    expected = [c for c, ok in zip(traces["completion"], traces["correct"]) if ok]
    assert 0 < len(expected) < len(traces)
    assert sft["completion"] == expected
    assert all(check_reasoning_answer(c, a) == 1.0 for c, a in zip(sft["completion"], sft["answer"]))


def test_label_traces_takes_any_callable_and_refuses_names():
    traces = make_reasoning_traces(10, seed=4).remove_columns("correct")
    labelled = label_traces(
        traces, verifier=lambda completion, answer: completion.rstrip().endswith(f"Answer: {answer}")
    )
    assert labelled["correct"] == [
        check_reasoning_answer(c, a) == 1.0 for c, a in zip(traces["completion"], traces["answer"])
    ]
    with pytest.raises(TypeError, match="verifier='toy' is not callable"):
        label_traces(traces, verifier="toy")


def test_math_verify_labels_boxed_answers():
    pytest.importorskip("math_verify")
    assert math_verify_checker(r"so x = \boxed{\frac{1}{2}}", "0.5")
    assert not math_verify_checker(r"so x = \boxed{3}", "0.5")
    assert math_verify_checker(r"\boxed{42}", 42)
    traces = Dataset.from_dict({"completion": [r"\boxed{7}", r"\boxed{8}"], "answer": ["7", "7"]})
    assert label_traces(traces, verifier=math_verify_checker)["correct"] == [True, False]


def test_two_processes_match_one_process(tmp_path):
    script = __file__.replace("test_redi.py", "_redi_distributed.py")
    run_distributed(script, str(tmp_path / "one" / "w.safetensors"), "1", nproc=1)
    run_distributed(script, str(tmp_path / "two" / "w.safetensors"), "2", nproc=2)
    one, two = load_file(tmp_path / "one" / "w.safetensors"), load_file(tmp_path / "two" / "w.safetensors")
    assert one["loss"].item() == pytest.approx(two["loss"].item(), rel=1e-5)
    # Compare the updates, at their own scale: two processes sum the gradient in another order.
    base = dict(AutoModelForCausalLM.from_pretrained(pretrained_toy_model_path()).named_parameters())
    assert one.keys() - {"loss"} == base.keys()
    for name, w0 in base.items():
        update_one, update_two = one[name] - w0.detach(), two[name] - w0.detach()
        atol = 1e-5 * update_one.abs().max().item() + 1e-6
        torch.testing.assert_close(update_two, update_one, rtol=1e-4, atol=atol, msg=name)
