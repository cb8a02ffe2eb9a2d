"""The two-stage REDI recipe runs end to end on the toy default, from its YAML config plus flags."""

import os
import subprocess
import sys

from transformers import AutoModelForCausalLM

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_two_stage_recipe_cli_with_yaml_config(tmp_path):
    cmd = [sys.executable, "-m", "recipes.redi_two_stage", "--config", "recipes/configs/redi.yaml",
           "--output_dir", str(tmp_path), "--max_steps", "1", "--sft_max_steps", "2", "--num_toy_prompts", "16",
           "--num_eval_prompts", "4", "--per_device_train_batch_size", "2", "--disable_tqdm", "true"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy_after_sft" in proc.stdout and "accuracy_after_redi" in proc.stdout
    assert (tmp_path / "sft" / "config.json").exists()  # stage 1 saved
    AutoModelForCausalLM.from_pretrained(tmp_path)  # stage 2 saved and loads
