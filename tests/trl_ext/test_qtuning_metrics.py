"""Every metric QTuningSFTTrainer logs, on one optimizer step, against an independent source.

SFT's metrics (loss, ``entropy``, ``mean_token_accuracy``, ``num_tokens``, MoE ``aux_loss``) and the window's
``num_items_in_batch`` must equal stock ``SFTTrainer`` on the same batches with the dropped labels set to -100
(``scoring="reuse"``) or on the kept rows alone (``scoring="separate"``), the kept tokens chosen by the slow
reference in ``qtuning_reference.py`` from a full-logit forward. Q-Tuning's own ``qtuning/*`` metrics must equal
the reference's selection. fp32, at 1e-6.
"""

import copy

import pytest
import qtuning_reference as ref
import torch
from trl import SFTConfig, SFTTrainer

from peft_trl_testbed import build_toy_moe_model, make_mixed_quality_sft, pretrained_toy_model_path, toy_args
from peft_trl_testbed.tokenizer import build_toy_tokenizer
from trl_ext import QTuningConfig, QTuningSFTTrainer
from trl_ext._compat import sft_metrics

R_SAMPLE, R_TOKEN, LAMBDA = 0.5, 0.7, 0.5
ROWS = 8  # per micro-batch


def _moe_model():
    return build_toy_moe_model(), build_toy_tokenizer()


def _trainers(tmp_path, arch, scoring, loss_type):
    data = make_mixed_quality_sft(2 * ROWS, seed=3)
    if arch == "moe":
        model, tokenizer = _moe_model()
        models, extra = (model, copy.deepcopy(model)), dict(processing_class=tokenizer)
    else:
        models, extra = (pretrained_toy_model_path(),) * 2, {}
    common = dict(per_device_train_batch_size=ROWS, max_steps=1, disable_tqdm=True, loss_type=loss_type)
    qtuning_args = toy_args(
        QTuningConfig,
        tmp_path / "qtuning",
        scoring=scoring,
        sample_keep_ratio=R_SAMPLE,
        token_keep_ratio=R_TOKEN,
        neighbor_lambda=LAMBDA,
        **common,
    )
    qtuning = QTuningSFTTrainer(model=models[0], args=qtuning_args, train_dataset=data, **extra)
    stock = SFTTrainer(
        model=models[1], args=toy_args(SFTConfig, tmp_path / "stock", **common), train_dataset=data, **extra
    )
    return qtuning, stock


def _reference_selection(model, batch):
    """Full-logit forward in float64, then the spec by the slow reference: (quadrants, a, filled, keep mask)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    _, quad, a, filled, keep = ref.select_from_logits(logits, batch["labels"][:, 1:], R_SAMPLE, R_TOKEN, LAMBDA)
    return quad, a, filled, keep


def _stock_batch(batch, keep, scoring):
    """The batch stock SFT trains on: dropped labels at -100; for "separate", only the kept rows, cut after the last
    kept label (later tokens cannot change earlier ones under causal attention)."""
    labels = batch["labels"].clone()
    labels[:, 1:][~keep] = -100
    stock = {**batch, "labels": labels}
    if scoring == "reuse":
        return stock
    rows = keep.any(1).nonzero().flatten()
    length = int(keep[rows].any(0).nonzero().max()) + 2
    return {k: v[rows, :length] for k, v in stock.items()}


def _step(trainer, batches):
    """One optimizer step's worth of Trainer's calls: prefetch the window, then compute_loss and backward each."""
    model = trainer.model
    model.train()
    model.zero_grad()
    sft_metrics(trainer).clear()
    trainer._total_train_tokens = 0
    batches, num_items_in_batch = trainer.get_batch_samples(iter(batches), len(batches), trainer.args.device)
    trainer.current_gradient_accumulation_steps = len(batches)
    losses = []
    for batch in batches:
        loss = trainer.compute_loss(model, trainer._prepare_inputs(batch), num_items_in_batch=num_items_in_batch)
        loss.backward()
        losses.append(loss.item())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return num_items_in_batch, losses, grads, {k: list(v) for k, v in sft_metrics(trainer).items()}


@pytest.mark.parametrize(
    "arch, scoring, window, loss_type",
    [
        ("llama", "reuse", 1, "nll"),
        ("llama", "reuse", 2, "nll"),
        ("llama", "separate", 1, "nll"),
        ("llama", "separate", 2, "nll"),
        ("llama", "reuse", 2, "dft"),
        ("moe", "reuse", 1, "nll"),
        ("moe", "separate", 2, "nll"),
    ],
)
def test_metrics_equal_sft_on_the_kept_tokens_and_the_reference_selection(tmp_path, arch, scoring, window, loss_type):
    qtuning, stock = _trainers(tmp_path, arch, scoring, loss_type)
    examples = [qtuning.train_dataset[i] for i in range(window * ROWS)]
    batches = [qtuning.data_collator(examples[i * ROWS : (i + 1) * ROWS]) for i in range(window)]
    selections = [_reference_selection(stock.model, b) for b in batches]
    assert all(not torch.equal(keep, torch.ones_like(keep)) for *_, keep in selections)

    ours = _step(qtuning, [dict(b) for b in batches])
    theirs = _step(stock, [_stock_batch(b, keep, scoring) for b, (*_, keep) in zip(batches, selections)])

    (our_items, our_losses, our_grads, our_metrics), (stock_items, stock_losses, stock_grads, stock_metrics) = (
        ours,
        theirs,
    )
    # Our selection is the reference's, micro-batch by micro-batch.
    assert [r.quadrant.tolist() for r in qtuning.eu_records] == [quad for quad, *_ in selections]
    if not (scoring == "reuse" and window == 1):  # that window is normalised inside compute_loss
        assert float(our_items) == float(stock_items) == sum(int(keep.sum()) for *_, keep in selections)
    assert our_losses == pytest.approx(stock_losses, rel=1e-6)
    assert our_grads.keys() == stock_grads.keys()
    for name in stock_grads:
        scale = stock_grads[name].abs().max().item()
        torch.testing.assert_close(our_grads[name], stock_grads[name], rtol=1e-6, atol=1e-6 * scale, msg=name)

    # SFT's metrics, from SFTTrainer's own code path.
    sft_keys = {k for k in our_metrics if not k.startswith("qtuning/")}
    assert sft_keys == set(stock_metrics) >= {"entropy", "mean_token_accuracy", "num_tokens"}
    assert ("aux_loss" in sft_keys) == (arch == "moe")
    for key in sft_keys:
        assert our_metrics[key] == pytest.approx(stock_metrics[key], rel=1e-6), key

    # Q-Tuning's own metrics, one entry per micro-batch.
    expected = {name: [] for name in ("q1", "q2", "q3", "q4", "between", "samples", "kept_samples", "filled_samples")}
    expected.update({"kept_token_fraction": [], "kept_token_fraction_target": [], "a": []})
    for batch, (quad, a, filled, keep) in zip(batches, selections):
        for name, q in (("q1", 1), ("q2", 2), ("q3", 3), ("q4", 4), ("between", 0)):
            expected[name].append(sum(x == q for x in quad))
        expected["samples"].append(len(quad))
        expected["kept_samples"].append(sum(x in (2, 4) for x in quad))
        expected["filled_samples"].append(filled)
        expected["kept_token_fraction"].append(int(keep.sum()) / int((batch["labels"][:, 1:] != -100).sum()))
        expected["kept_token_fraction_target"].append(R_SAMPLE * R_TOKEN)
        expected["a"].append(float(a))
    assert {k for k in our_metrics if k.startswith("qtuning/")} == {f"qtuning/{name}" for name in expected}
    for name, values in expected.items():
        assert our_metrics[f"qtuning/{name}"] == pytest.approx(values, rel=1e-6), name
