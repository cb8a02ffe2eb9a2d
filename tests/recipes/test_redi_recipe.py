"""The two-stage REDI recipe runs end to end on the toy default, from flags and from YAML."""

import os
import subprocess
import sys

from transformers import AutoModelForCausalLM

from recipes.redi_two_stage import REDIRecipeArguments, main
from trl_ext import REDIConfig
from trl_ext.toy import toy_args


def test_two_stage_recipe_runs(tmp_path):
    recipe = REDIRecipeArguments(num_toy_prompts=24, sft_max_steps=3, sft_batch_size=8, num_eval_prompts=8)
    args = toy_args(REDIConfig, tmp_path / "redi", max_steps=2, per_device_train_batch_size=4, disable_tqdm=True)
    results = main(recipe, args)
    assert results["pairs"] > 0 and set(results) >= {"accuracy_after_sft", "accuracy_after_redi", "dropped"}
    assert (tmp_path / "redi" / "sft" / "config.json").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "redi")  # the REDI model is saved and loads


def test_recipe_cli_with_yaml_config(tmp_path):
    config = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "configs", "redi.yaml")
    cmd = [sys.executable, "-m", "recipes.redi_two_stage", "--config", config, "--output_dir", str(tmp_path),
           "--max_steps", "1", "--sft_max_steps", "2", "--num_toy_prompts", "16", "--num_eval_prompts", "4",
           "--per_device_train_batch_size", "2", "--disable_tqdm", "true"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(config) + "/../..")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[redi]" in proc.stdout and (tmp_path / "model.safetensors").exists()
