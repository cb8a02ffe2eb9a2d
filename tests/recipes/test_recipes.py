"""Each recipe runs end to end on the toy default for a few steps and saves what it trained."""

from peft import PeftModel
from transformers import AutoModelForCausalLM
from trl import ScriptArguments, SFTConfig

from recipes import mora_sft, prefix_grouper_grpo, qtuning_sft
from trl_ext import PrefixGrouperGRPOConfig, QTuningConfig
from trl_ext.toy import pretrained_toy_model_path, toy_args


def test_mora_sft_recipe(tmp_path):
    args = toy_args(SFTConfig, tmp_path, max_steps=2, per_device_train_batch_size=8, disable_tqdm=True)
    results = mora_sft.main(ScriptArguments(), mora_sft.MoraArguments(mora_r=4), args)
    assert {"accuracy_before", "accuracy_after", "update_rank"} <= set(results)
    assert results["update_rank"] > results["lora_rank_same_params"]  # the high-rank update MoRA exists for
    import peft_ext  # noqa: F401  (registers MORA for loading)

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrained_toy_model_path()), tmp_path)
    assert model.peft_config["default"].peft_type == "MORA"


def test_qtuning_recipe_writes_eu_plane(tmp_path):
    args = toy_args(QTuningConfig, tmp_path, max_steps=2, per_device_train_batch_size=8, disable_tqdm=True)
    results = qtuning_sft.main(ScriptArguments(), qtuning_sft.ModelArguments(), args)
    assert (tmp_path / "eu_plane.png").stat().st_size > 1000
    assert any("qtuning/kept_samples" in h for h in results["log_history"])


def test_prefix_grouper_recipe(tmp_path):
    args = toy_args(PrefixGrouperGRPOConfig, tmp_path, max_steps=2, per_device_train_batch_size=8,
                    num_generations=4, max_completion_length=4, disable_tqdm=True)  # fmt: skip
    results = prefix_grouper_grpo.main(ScriptArguments(), prefix_grouper_grpo.GRPORecipeArguments(), args)
    assert "reward_first" in results and (tmp_path / "model.safetensors").exists()


def test_subnet_recipe_selects_and_retrains(tmp_path):
    from trl import GRPOConfig

    from recipes import subnet_grpo

    args = toy_args(GRPOConfig, tmp_path, max_steps=2, per_device_train_batch_size=8, num_generations=4,
                    max_completion_length=4, learning_rate=1e-4, max_grad_norm=0.0, disable_tqdm=True)  # fmt: skip
    results = subnet_grpo.main(subnet_grpo.SubnetRecipeArguments(), args)
    assert 0 < results["density"] < 1 and results["trainable"] > 0
    assert (tmp_path / "subnet_sparsity.png").exists()
    assert (tmp_path / "subnet" / "adapter_model.safetensors").exists()
