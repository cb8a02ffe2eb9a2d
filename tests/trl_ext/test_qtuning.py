"""QTuningSFTTrainer: loss against an independent masked loss, separate vs reuse, packing, PEFT, metrics, plot."""

import math

import pytest
import qtuning_reference as ref
import torch
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from peft_ext import MoraConfig
from peft_trl_testbed import make_mixed_quality_sft, pretrained_toy_model_path, toy_args
from trl_ext import QTuningConfig, QTuningSFTTrainer


def _trainer(tmp_path, train_size=48, **overrides):
    kwargs = dict(per_device_train_batch_size=8, disable_tqdm=True, max_steps=1)
    kwargs.update(overrides)
    peft_config = kwargs.pop("peft_config", None)
    args = toy_args(QTuningConfig, tmp_path / "out", **kwargs)
    return QTuningSFTTrainer(
        model=pretrained_toy_model_path(),
        args=args,
        train_dataset=make_mixed_quality_sft(train_size, seed=3),
        peft_config=peft_config,
    )


def _batch(trainer, n=8):
    return trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(n)]))


def _assert_no_dropout(model):
    # Train mode equals eval mode only without dropout; the toy models have none.
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert getattr(model.config, "attention_dropout", 0.0) == 0.0


def _loss_and_grads(trainer, batch, scoring):
    trainer.args.scoring = scoring
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _reference_masked_loss(model, batch, r_s, r_t, lam):
    """Full-logit forward, then the spec by slow reference functions, then the mean NLL over kept tokens."""
    with torch.no_grad():
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        logits = model(**kwargs).logits[:, :-1].double()
    nll, quad, _, _, keep = ref.select_from_logits(logits, batch["labels"][:, 1:], r_s, r_t, lam)
    return (nll * keep).sum() / keep.sum(), quad, keep


@pytest.mark.parametrize("ratios", [(0.25, 0.5), (0.5, 0.7)])
def test_reuse_loss_equals_independent_masked_loss(tmp_path, ratios):
    r_s, r_t = ratios
    trainer = _trainer(tmp_path, scoring="reuse", sample_keep_ratio=r_s, token_keep_ratio=r_t)
    batch = _batch(trainer, 8)
    trainer.model.train()
    _assert_no_dropout(trainer.model)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    expected, quad, keep = _reference_masked_loss(trainer.model, batch, r_s, r_t, 0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    record = trainer.eu_records[-1]
    assert record.quadrant.tolist() == quad
    metrics = trainer._metrics["train"]
    assert metrics["qtuning/kept_samples"][-1] == sum(q in (2, 4) for q in quad) == round(8 * r_s)
    n_response = int((batch["labels"][:, 1:] != -100).sum())
    assert metrics["qtuning/kept_token_fraction"][-1] == pytest.approx(int(keep.sum()) / n_response)


def _assert_same(a, b, what):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-5), what
    assert grads_a.keys() == grads_b.keys() and grads_a, what
    for name in grads_a:
        # Rounding only: differences far below the gradient's own scale, whatever the float path.
        atol = 1e-5 * grads_b[name].abs().max().item()
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=atol, msg=f"{what}: {name}")


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_separate_matches_reuse_loss_and_gradients(tmp_path, packing):
    overrides = dict(sample_keep_ratio=0.25, token_keep_ratio=0.5)
    if packing:
        overrides.update(packing=True, max_length=48)
    trainer = _trainer(tmp_path, **overrides)
    _assert_no_dropout(trainer.model)
    batch = _batch(trainer, 4 if packing else 8)
    if packing:
        assert "attention_mask" not in batch and (batch["position_ids"] == 0).sum() > 8  # several documents per row
    reuse = _loss_and_grads(trainer, batch, "reuse")
    reuse_tokens = trainer._total_train_tokens
    separate = _loss_and_grads(trainer, batch, "separate")
    _assert_same(reuse, separate, "separate vs reuse")
    # Separate mode trains on a smaller batch: num_tokens counts what went through forward and backward.
    assert 0 < trainer._total_train_tokens - reuse_tokens < reuse_tokens / 2


def test_separate_matches_reuse_with_lora(tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = _trainer(tmp_path, peft_config=lora)
    batch = _batch(trainer, 8)
    reuse = _loss_and_grads(trainer, batch, "reuse")
    separate = _loss_and_grads(trainer, batch, "separate")
    _assert_same(reuse, separate, "LoRA separate vs reuse")
    assert reuse[1] and all("lora_" in name for name in reuse[1])


@pytest.mark.parametrize("adapter", ["lora", "mora"])
def test_trains_with_adapters(tmp_path, adapter):
    if adapter == "mora":
        config = MoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    else:
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    trainer = _trainer(tmp_path, peft_config=config, max_steps=2, learning_rate=1e-2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(adapter + "_" in n for n in changed), sorted(changed)[:5]
    assert trainer.state.log_history[0]["qtuning/kept_samples"] == 2


@pytest.mark.parametrize("scoring", ["separate", "reuse"])
def test_training_logs_selection_metrics_and_plots(tmp_path, scoring):
    trainer = _trainer(tmp_path, scoring=scoring, max_steps=2, sample_keep_ratio=0.5, token_keep_ratio=0.7)
    trainer.train()
    log = trainer.state.log_history[0]
    for key in ("q1", "q2", "q3", "q4", "between", "samples", "kept_samples", "filled_samples", "a"):
        assert f"qtuning/{key}" in log, key
    assert log["qtuning/q1"] + log["qtuning/q2"] + log["qtuning/q3"] + log["qtuning/q4"] + log["qtuning/between"] == 8
    assert log["qtuning/kept_samples"] == log["qtuning/q2"] + log["qtuning/q4"] == 4
    assert 0 < log["qtuning/kept_token_fraction"] <= 1
    assert log["qtuning/kept_token_fraction_target"] == pytest.approx(0.35)
    assert {"loss", "entropy", "mean_token_accuracy", "num_tokens"} <= log.keys()
    assert [r.step for r in trainer.eu_records] == [0, 1]
    path = tmp_path / "eu.png"
    trainer.plot_eu_plane(path, steps=0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trainer.plot_eu_plane(tmp_path / "all.png")  # every recorded batch, median thresholds
    with pytest.raises(ValueError, match="No EU-plane records"):
        trainer.plot_eu_plane(steps=99)


def test_packed_training_runs_and_counts_documents(tmp_path):
    trainer = _trainer(tmp_path, packing=True, max_length=64, per_device_train_batch_size=2, max_steps=2)
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["qtuning/samples"] > 2  # documents, not packed rows, are the samples
    assert log["qtuning/kept_samples"] == math.floor(log["qtuning/samples"] * 0.25 + 0.5)


def test_evaluation_is_not_pruned(tmp_path):
    eval_dataset = make_mixed_quality_sft(16, seed=9)
    trainer = _trainer(tmp_path, per_device_eval_batch_size=8)
    ours = trainer.evaluate(eval_dataset)["eval_loss"]
    stock_args = toy_args(SFTConfig, tmp_path / "stock", per_device_eval_batch_size=8, disable_tqdm=True)
    stock = SFTTrainer(
        model=pretrained_toy_model_path(), args=stock_args, train_dataset=eval_dataset, eval_dataset=eval_dataset
    )
    assert ours == pytest.approx(stock.evaluate()["eval_loss"], rel=1e-6)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(sample_keep_ratio=0.0), r"sample_keep_ratio=0.0 is outside \(0, 1\]"),
        (dict(token_keep_ratio=1.5), r"token_keep_ratio=1.5 is outside \(0, 1\]"),
        (dict(neighbor_lambda=-0.1), r"neighbor_lambda=-0.1"),
        (dict(scoring="both"), r"scoring='both'.*'reuse'.*'separate'"),
        (dict(eu_record_steps=-1), r"eu_record_steps=-1"),
        (dict(packing=True, packing_strategy="wrapped", max_length=32), r"packing_strategy='wrapped'.*'bfd'"),
    ],
)
def test_config_errors_name_the_value_and_the_fix(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        toy_args(QTuningConfig, tmp_path, **overrides)


def test_trainer_errors(tmp_path):
    with pytest.raises(TypeError, match="takes a QTuningConfig"):
        QTuningSFTTrainer(model=pretrained_toy_model_path(), args={"output_dir": str(tmp_path)})
    args = toy_args(QTuningConfig, tmp_path, scoring="reuse", label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match="scoring='separate'"):
        QTuningSFTTrainer(model=pretrained_toy_model_path(), args=args, train_dataset=make_mixed_quality_sft(8))


@pytest.mark.parametrize("size", ["get_tp_size", "get_cp_size", "get_sp_size"])
def test_trainer_refuses_tensor_context_and_sequence_parallelism(tmp_path, monkeypatch, size):
    # Trainer reads these sizes from the accelerator's parallelism config (or the model's tensor-parallel plan).
    monkeypatch.setattr(QTuningSFTTrainer, size, lambda self: 2)
    name = size.removeprefix("get_")
    with pytest.raises(ValueError, match=rf"{name}=2.*data parallelism"):
        _trainer(tmp_path)


def test_trainer_refuses_shift_labels(tmp_path):
    trainer = _trainer(tmp_path)
    batch = _batch(trainer, 4)
    batch["shift_labels"] = batch["labels"][:, 1:]
    trainer.model.train()
    with pytest.raises(ValueError, match="shift_labels"):
        trainer.compute_loss(trainer.model, batch)
