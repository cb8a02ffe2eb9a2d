"""The checks every recipe shares (``recipes.common``): a usable output folder, flags set on the command
line or in YAML, and the record of which run wrote a checkpoint."""

import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
from peft import LoraConfig
from trl import SFTConfig

from recipes.common import RunRecord, adapter_record, check_output_dir, make_recipe_parser, refuse_ignored_flags
from recipes.mora_sft import MoraScriptArguments


def test_check_output_dir_creates_a_folder_and_refuses_files(tmp_path):
    assert check_output_dir(tmp_path / "a" / "b") == str(tmp_path / "a" / "b") and (tmp_path / "a" / "b").is_dir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is an existing file"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(ValueError, match="which is a file"):
        check_output_dir(tmp_path / "f" / "g" / "h")
    with pytest.raises(ValueError, match="--output_dir is empty"):
        check_output_dir("")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
        with pytest.raises(ValueError, match="cannot be created"):
            check_output_dir(locked / "run")


def test_a_flag_given_with_its_default_value_counts_as_given(tmp_path):
    parser = make_recipe_parser(MoraScriptArguments, SFTConfig)
    config = tmp_path / "c.yaml"
    config.write_text("lora_alpha: 32\noutput_dir: x\n")
    script_args, training_args, model_args = parser.parse_args_and_config(
        args=["--lora_r", "16", "--use_peft", "false", "--config", str(config)]
    )
    assert {"lora_r", "use_peft", "lora_alpha", "output_dir"} <= script_args.given_flags
    with pytest.raises(ValueError, match="--lora_r 16 would be ignored: because"):
        refuse_ignored_flags("r", {"lora_r": "because"}, script_args, training_args, model_args)
    # Not given and at its default: not refused.
    refuse_ignored_flags("r", {"lora_dropout": "because"}, script_args, training_args, model_args)


def test_run_record_compares_recipe_method_and_adapter(tmp_path):
    lora = adapter_record(LoraConfig(r=8, target_modules={"q_proj", "v_proj"}))
    assert json.loads(json.dumps(lora)) == lora and lora["target_modules"] == ["q_proj", "v_proj"]
    RunRecord("qtuning_sft", "Q-Tuning SFT", lora).save(tmp_path)
    RunRecord("qtuning_sft", "Q-Tuning SFT", lora).check(tmp_path)
    with pytest.raises(
        ValueError, match=r"LORA adapter config differs from this run's \(r: 8 in the checkpoint, 4 now\)"
    ):
        RunRecord(
            "qtuning_sft", "Q-Tuning SFT", adapter_record(LoraConfig(r=4, target_modules={"q_proj", "v_proj"}))
        ).check(tmp_path)
    with pytest.raises(ValueError, match=r"LORA adapter\), but this run is recipe qtuning_sft \(Q-Tuning SFT, full"):
        RunRecord("qtuning_sft", "Q-Tuning SFT").check(tmp_path)


class _PushingTrainer:
    """What ``save_model``/``push_to_hub`` use of a Trainer; ``push_to_hub`` writes a TRL-like card, as TRL does."""

    def __init__(self, model, output_dir):
        self.model, self.hub_model_id, self.pushed = model, "me/run", []
        self.args = SimpleNamespace(output_dir=str(output_dir), push_to_hub=True, hub_token="hf_x", hub_revision="dev")

    def is_world_process_zero(self):
        return True

    def save_model(self, output_dir):
        self.model.save_pretrained(output_dir)

    def push_to_hub(self, dataset_name=None):
        Path(self.args.output_dir, "README.md").write_text(
            f"---\ntags:\n- trl\n---\n# Model trained on {dataset_name}\n"
        )
        self.pushed.append(dataset_name)


@pytest.mark.parametrize("adapter", ["mora", "lora"])
def test_push_to_hub_adds_the_loading_section_to_the_card_of_peft_ext_adapters(adapter, monkeypatch, tmp_path):
    from huggingface_hub import HfApi
    from peft import get_peft_model

    import peft_ext
    from peft_trl_testbed.models import build_toy_model
    from recipes import common

    uploads = []
    monkeypatch.setattr(HfApi, "upload_file", lambda self, **kwargs: uploads.append(dict(kwargs)))
    base = build_toy_model(arch="llama", hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    config = peft_ext.MoraConfig(r=2, target_modules=["q_proj"]) if adapter == "mora" else LoraConfig(r=2)
    trainer = _PushingTrainer(get_peft_model(base, config), tmp_path)
    common.save_model(trainer, str(tmp_path))
    assert ("peft-trl-ext" in (tmp_path / "README.md").read_text()) == (adapter == "mora")
    common.push_to_hub(trainer, "sums")
    assert trainer.pushed == ["sums"]
    if adapter == "lora":
        assert uploads == []
        return
    (upload,) = uploads
    card = Path(upload.pop("path_or_fileobj")).read_text()
    assert upload == dict(
        path_in_repo="README.md",
        repo_id="me/run",
        token="hf_x",
        revision="dev",
        commit_message="Add how to load this adapter",
    )
    assert (
        "# Model trained on sums" in card and 'from_pretrained("me/run", revision="dev")' in card and "- trl" in card
    )
