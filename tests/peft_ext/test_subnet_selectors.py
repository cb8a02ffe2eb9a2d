"""Subnet mask selectors (checkpoint diff, warm-up callback, baselines), analysis tables and the CLI."""

import copy
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from peft_ext.subnet import (
    MaskFile,
    SubnetWarmupCallback,
    analysis,
    diff_checkpoints,
    magnitude_masks,
    random_masks,
    save_masks,
    top_fraction_masks,
)
from peft_ext.subnet.__main__ import main as cli
from peft_trl_testbed.models import build_toy_model, toy_model_path

REPO_ROOT = Path(__file__).resolve().parents[2]
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A base and a tuned checkpoint, both sharded; the tuned one moves some entries by 1e-3 and some by 1e-7."""
    root = tmp_path_factory.mktemp("ckpt")
    base = build_toy_model(arch="llama", **SIZES)
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tuned.parameters():
            r = torch.rand(p.shape, generator=g)
            p += torch.where(r < 0.2, 1e-3, 0.0) + torch.where(r > 0.9, 1e-7, 0.0)
    base.save_pretrained(root / "base", max_shard_size="20KB")
    tuned.save_pretrained(root / "tuned", max_shard_size="20KB")
    assert len(list((root / "base").glob("*.safetensors"))) > 2  # really sharded
    before = {n: p.detach().clone() for n, p in base.state_dict().items()}
    after = {n: p.detach().clone() for n, p in tuned.state_dict().items()}
    return root, before, after


@pytest.mark.parametrize(("tol", "relative"), [(1e-5, False), (1e-3, True), (0.0, False)])
def test_diff_matches_dense_reference(checkpoints, tmp_path, tol, relative):
    root, before, after = checkpoints
    out = tmp_path / "masks.safetensors"
    diff = diff_checkpoints(
        root / "base",
        root / "tuned",
        tol=tol,
        relative=relative,
        out=out,
        keep_masks=True,
        chunk_numel=1000,
        progress=False,
    )
    masks = MaskFile(out)
    assert set(diff.masks) == set(before) == set(masks.names())
    changed = 0
    for name in before:
        delta = (after[name] - before[name]).abs()
        bound = tol * torch.maximum(before[name].abs(), after[name].abs()) if relative else tol
        expected = delta > bound
        assert torch.equal(diff.masks[name], expected), name
        assert torch.equal(masks.mask(name), expected), name
        changed += int(expected.sum())
    assert diff.changed == changed and diff.numel == sum(t.numel() for t in before.values())


def test_diff_rejects_different_names_or_shapes(checkpoints, tmp_path):
    root, _, _ = checkpoints
    build_toy_model(arch="llama", hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(
        tmp_path / "a"
    )
    with pytest.raises(ValueError, match="different parameter names"):
        diff_checkpoints(root / "base", tmp_path / "a", progress=False)
    build_toy_model(arch="llama", hidden_size=16, num_hidden_layers=2, num_attention_heads=4).save_pretrained(
        tmp_path / "b"
    )
    with pytest.raises(ValueError, match=r"has shape \(\d+, 32\) in .* but \(\d+, 16\)"):
        diff_checkpoints(root / "base", tmp_path / "b", progress=False)


def test_baselines_and_budget_selection():
    model = build_toy_model(arch="llama", **SIZES)
    rnd = random_masks(model, 0.1, seed=0, include=["q_proj"])
    assert set(rnd) == {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)}
    assert all(int(m.sum()) == round(0.1 * m.numel()) for m in rnd.values())
    mag = magnitude_masks(model, 0.25, include=["up_proj"])
    for name, mask in mag.items():
        w = dict(model.named_parameters())[name].detach().abs()
        assert w[mask].min() >= w[~mask].max()
    scores = {"a": torch.tensor([5.0, 1.0, 0.5]), "b": torch.tensor([[4.0, 3.0], [0.1, 0.2]])}
    glob = top_fraction_masks(scores, density=3 / 7)
    assert glob["a"].tolist() == [True, False, False] and glob["b"].tolist() == [[True, True], [False, False]]
    per = top_fraction_masks(scores, density=0.5, per_tensor=True)
    assert per["a"].tolist() == [True, True, False] and per["b"].tolist() == [[True, True], [False, False]]


def test_warmup_callback_collects_statistics_during_grpo(tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    from peft_trl_testbed.data import make_arithmetic_dataset
    from peft_trl_testbed.tokenizer import build_toy_tokenizer

    path = toy_model_path(arch="llama", **SIZES)
    model = AutoModelForCausalLM.from_pretrained(path)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = random.Random(0)

    def noisy_reward(completions, **kwargs):  # reward variance so that GRPO's advantages are non-zero
        return [rng.random() for _ in completions]

    update, grad = SubnetWarmupCallback("update"), SubnetWarmupCallback("grad", include=["mlp"])
    args = GRPOConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=3,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        activation_checkpointing=True,  # GRPOConfig's default, under the name transformers no longer deprecates
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=noisy_reward,
        args=args,
        train_dataset=make_arithmetic_dataset(16),
        processing_class=build_toy_tokenizer(),
        callbacks=[update, grad],
    )
    trainer.train()
    assert update.optimizer_steps == 2
    params = dict(model.named_parameters())
    masks = update.masks(tol=0.0)
    assert set(masks) == {n for n, p in params.items() if p.dim() == 2}
    for name, mask in masks.items():
        assert torch.equal(mask, params[name].detach() != initial[name]), name
    assert sum(int(m.sum()) for m in masks.values()) > 0
    budget = update.masks(density=0.01)
    total = sum(m.numel() for m in budget.values())
    assert sum(int(m.sum()) for m in budget.values()) == round(0.01 * total)
    grad_scores = grad.scores()
    assert set(grad_scores) == {n for n in masks if "mlp" in n}
    for name, score in grad_scores.items():
        assert bool((score[masks[name]] > 0).all())  # whatever moved had a gradient


def test_sparsity_and_overlap_tables_match_brute_force():
    g = torch.Generator().manual_seed(0)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight", "model.norm.weight"]
    m1 = {n: torch.rand(6, 5, generator=g) < 0.3 for n in names}
    m2 = {n: torch.rand(6, 5, generator=g) < 0.6 for n in names}
    stats = analysis.stats_from_masks(m1)
    by_type = {row[0]: row for row in analysis.sparsity_by(stats, "type")}
    q = int(m1[names[0]].sum() + m1[names[1]].sum())
    assert by_type["q_proj"][1:3] == [60, q]
    assert by_type["total"][2] == sum(int(m.sum()) for m in m1.values())
    by_layer = {row[0]: row for row in analysis.sparsity_by(stats, "layer")}
    assert by_layer["1"][2] == int(m1[names[1]].sum()) and by_layer["-"][2] == int(m1[names[2]].sum())
    rows = analysis.overlap_rows(m1, m2)
    s1 = {(n, i) for n in names for i in torch.nonzero(m1[n].flatten()).flatten().tolist()}
    s2 = {(n, i) for n in names for i in torch.nonzero(m2[n].flatten()).flatten().tolist()}
    total = rows[-1]
    assert total[1:4] == [len(s1), len(s2), len(s1 & s2)]
    assert total[4] == pytest.approx(100 * len(s1 & s2) / len(s1))
    assert total[6] == pytest.approx(100 * len(s1 & s2) / len(s1 | s2))


def test_cli_diff_analyze_overlap_select(checkpoints, tmp_path, capsys):
    root, _, _ = checkpoints
    masks1, masks2, plot = tmp_path / "m1.safetensors", tmp_path / "m2.safetensors", tmp_path / "sparsity.png"
    assert (
        cli(
            [
                "diff",
                str(root / "base"),
                str(root / "tuned"),
                "--tol",
                "1e-5",
                "--out",
                str(masks1),
                "--quiet",
                "--rank",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "parameters updated" in out and "per matrix type" in out and "update rank" in out
    assert cli(["analyze", str(masks1), "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli(["select", "random", str(root / "base"), "--density", "0.2", "--out", str(masks2)]) == 0
    capsys.readouterr()
    assert cli(["overlap", str(masks1), str(masks2), "--per-tensor"]) == 0
    assert "jaccard" in capsys.readouterr().out
    assert cli(["diff", str(root / "base"), str(tmp_path / "nowhere"), "--out", str(masks1)]) == 2
    # the module entry point, in a fresh process
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "peft_ext.subnet",
            "analyze",
            str(root / "base"),
            str(root / "tuned"),
            "--relative",
            "--quiet",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "tolerance 0.001 (relative)" in result.stdout


def test_save_masks_stores_compact_encodings(tmp_path):
    masks = {"dense": torch.ones(64, 64, dtype=torch.bool), "sparse": torch.zeros(64, 64, dtype=torch.bool)}
    masks["sparse"][0, :5] = True
    nbytes = save_masks(masks, tmp_path / "m.safetensors")
    assert nbytes == {"dense": 64 * 64 // 8, "sparse": 5 * 4}
    loaded = MaskFile(tmp_path / "m.safetensors")
    assert torch.equal(loaded.mask("sparse"), masks["sparse"]) and loaded.shape("dense") == (64, 64)
