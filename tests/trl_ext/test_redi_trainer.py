"""REDI trainer (``trl_ext.redi.trainer``): its loss against the closed form, alpha=0 against SFT, no reference
model, every logged metric against the stock DPOTrainer on the same batch or against the closed form, errors."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import trl.trainer.dpo_trainer as dpo_module
from datasets import Dataset
from distributed_helpers import run_distributed
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from peft_ext import MoraConfig
from peft_trl_testbed import build_toy_moe_model, make_reasoning_preferences, pretrained_toy_model_path, toy_args
from peft_trl_testbed.tokenizer import build_toy_tokenizer
from trl_ext import REDIConfig, REDITrainer


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
    expected = sum(-logps[i] / lengths[i] + alpha * logps[n + i] / lengths[n + i] for i in range(n)) / n
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
    # nor does one built from a config, which has no path a reference could be loaded from
    built = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(pretrained_toy_model_path()).config)
    built.config.name_or_path = ""
    trainer = REDITrainer(
        model=built,
        args=args,
        train_dataset=make_reasoning_preferences(8),
        processing_class=AutoTokenizer.from_pretrained(pretrained_toy_model_path()),
    )
    assert len(loads) == instance_loads and trainer.ref_model is None
    with pytest.raises(ValueError, match="REDITrainer is reference-free.*Linear"):
        trainer.ref_model = torch.nn.Linear(1, 1)


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
        REDITrainer(
            model=pretrained_toy_model_path(),
            ref_model=pretrained_toy_model_path(),
            args=toy_args(REDIConfig, tmp_path),
            train_dataset=make_reasoning_preferences(4),
        )
    with pytest.raises(TypeError, match="takes a REDIConfig"):
        REDITrainer(
            model=pretrained_toy_model_path(),
            args={"output_dir": str(tmp_path)},
            train_dataset=make_reasoning_preferences(4),
        )


def test_redi_logs_aux_loss_on_moe_models(tmp_path):
    tokenizer = build_toy_tokenizer()
    model = build_toy_moe_model()
    args = toy_args(REDIConfig, tmp_path, max_steps=1, per_device_train_batch_size=4)
    trainer = REDITrainer(
        model=model, args=args, train_dataset=make_reasoning_preferences(4, seed=1), processing_class=tokenizer
    )
    assert trainer._prefix_sharing_rule is None  # automatic prefix sharing stands down for the aux loss
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "aux_loss" in entry]
    assert logged and logged[0]["aux_loss"] > 0


# DPO's metrics that need its reference model; REDI logs its own quantities instead.
DPO_ONLY_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/margins"}
REDI_ONLY_METRICS = {"logps_norm/chosen", "logps_norm/rejected", "logps_norm/margin"}
# Same name, REDI's meaning: the share of pairs with a higher length-normalised log-likelihood for the chosen trace.
REDI_MEANING = {"rewards/accuracies"}


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_policy_metrics_match_dpo_trainer_on_one_batch(tmp_path, kind):
    """Every metric REDI logs, on one batch in fp32: the policy's (entropy, token accuracy, logits, summed logps,
    token count, aux_loss) equal the stock DPOTrainer's on the same model and batch; REDI's own (normalised logps,
    their margin and accuracy, and the loss) equal the closed form from the plain logits."""
    if kind == "dense":
        tokenizer = AutoTokenizer.from_pretrained(pretrained_toy_model_path())
        policy = AutoModelForCausalLM.from_pretrained(pretrained_toy_model_path())
    else:
        tokenizer = build_toy_tokenizer()
        policy = build_toy_moe_model()
    data = make_reasoning_preferences(8, seed=1)
    settings = dict(per_device_train_batch_size=4, max_steps=1)
    redi = REDITrainer(
        model=copy.deepcopy(policy),
        args=toy_args(REDIConfig, tmp_path / "redi", **settings),
        train_dataset=data,
        processing_class=tokenizer,
    )
    dpo = DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(policy),
        train_dataset=data,
        args=toy_args(DPOConfig, tmp_path / "dpo", **settings),
        processing_class=tokenizer,
    )
    assert redi.aux_loss_enabled == dpo.aux_loss_enabled == (kind == "moe")
    batch = next(iter(redi.get_train_dataloader()))

    def logged(trainer, mode, tp_size=1):
        trainer.model.train(mode == "train")
        trainer._tp_size = tp_size  # tensor-parallel ranks see the same batch; DPO divides the token count by it
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, batch)
        return loss, {key: values[-1] for key, values in trainer._metrics[mode].items()}

    for mode, tp_size in (("train", 1), ("eval", 1), ("train", 2)):
        loss, ours = logged(redi, mode, tp_size)
        _, stock = logged(dpo, mode, tp_size)
        assert set(ours) == (set(stock) - DPO_ONLY_METRICS) | REDI_ONLY_METRICS
        assert ("aux_loss" in ours) == (kind == "moe")
        for key in sorted(set(ours) - REDI_ONLY_METRICS - REDI_MEANING):
            assert ours[key] == pytest.approx(stock[key], rel=1e-6, abs=1e-6), (mode, key)

    # REDI's own metrics and loss: the closed form, from a plain forward of the unpatched policy.
    with torch.no_grad():
        out = policy(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=kind == "moe"
        )
        logps, lengths = _closed_form_parts(policy, batch)
    n = logps.shape[0] // 2
    chosen, rejected = logps[:n] / lengths[:n], logps[n:] / lengths[n:]
    alpha = redi.args.redi_alpha
    expected_loss = (-chosen + alpha * rejected).mean()
    if kind == "moe":
        expected_loss = expected_loss + 0.01 * out.aux_loss
        assert ours["aux_loss"] == pytest.approx(out.aux_loss.item(), rel=1e-6)
    # 1e-6 of the size of the log-likelihoods the quantities are built from (a margin is a small difference of them)
    scale = chosen.abs().mean().item() + rejected.abs().mean().item()
    assert loss.item() == pytest.approx(expected_loss.item(), abs=1e-6 * scale)
    assert ours["logps_norm/chosen"] == pytest.approx(chosen.mean().item(), abs=1e-6 * scale)
    assert ours["logps_norm/rejected"] == pytest.approx(rejected.mean().item(), abs=1e-6 * scale)
    assert ours["logps_norm/margin"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-6 * scale)
    assert ours["rewards/accuracies"] == (chosen > rejected).float().mean().item()
    assert 0 < ours["rewards/accuracies"] < 1  # both outcomes occur, so a flipped comparison would show
    tokens = int(batch["attention_mask"].sum())
    assert ours["num_tokens"] == stock["num_tokens"] == tokens + tokens // 2  # train calls at tp_size=1 and 2


def test_two_processes_match_one_process(tmp_path):
    script = __file__.replace("test_redi_trainer.py", "_redi_distributed.py")
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
