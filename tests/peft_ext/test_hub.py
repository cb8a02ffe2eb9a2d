"""peft_ext.hub: explicit card and push functions; every keyword reaches its destination; no network (HfApi is mocked)."""

from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import peft_ext
from peft_ext.hub import SECTION_HEADING, add_usage_to_model_card, peft_ext_types
from peft_trl_testbed.models import toy_model_path

SIZES = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
IDS = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(0))
REPO = "me/toy-mora"  # never reached: HfApi is patched in every test that pushes


def base_model():
    return AutoModelForCausalLM.from_pretrained(toy_model_path(arch="llama", **SIZES))


def mora_model():
    torch.manual_seed(0)
    config = peft_ext.MoraConfig(r=2, target_modules=["q_proj", "up_proj"], init_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(base_model(), config).eval()


@pytest.fixture
def hub(monkeypatch):
    """A recording stand-in for the three HfApi calls a push makes; ``calls`` holds their keyword arguments."""
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = dict(kwargs, repo_id=repo_id)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_branch(self, **kwargs):
        calls["create_branch"] = kwargs

    def upload_folder(self, **kwargs):
        calls["upload_folder"] = kwargs
        calls["files"] = {p.name: p.read_bytes() for p in Path(kwargs["folder_path"]).iterdir()}
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_passes_every_keyword_and_uploads_a_loadable_adapter_with_its_card(hub, monkeypatch, tmp_path):
    model = mora_model()
    saved_with = {}
    original_save = model.save_pretrained

    def save_pretrained(save_directory, **kwargs):
        saved_with.update(kwargs)
        return original_save(save_directory, **kwargs)

    monkeypatch.setattr(model, "save_pretrained", save_pretrained)
    result = peft_ext.push_to_hub(
        model,
        REPO,
        commit_message="first adapter",
        commit_description="trained on sums",
        private=True,
        token="hf_test",
        revision="dev",
        create_pr=True,
        max_shard_size="1GB",
        tags=["mora", "toy"],
        selected_adapters=["default"],
        save_embedding_layers=False,
    )
    assert result == "commit-info"
    assert hub["create_repo"] == dict(repo_id=REPO, private=True, token="hf_test", exist_ok=True)
    assert hub["create_branch"] == dict(repo_id=REPO, branch="dev", token="hf_test", exist_ok=True)
    upload = {k: v for k, v in hub["upload_folder"].items() if k != "folder_path"}
    assert upload == dict(
        repo_id=REPO,
        commit_message="first adapter",
        commit_description="trained on sums",
        token="hf_test",
        revision="dev",
        create_pr=True,
    )
    assert saved_with == dict(max_shard_size="1GB", selected_adapters=["default"], save_embedding_layers=False)

    files = hub["files"]
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(files)
    card = files["README.md"].decode()
    assert card.count(SECTION_HEADING) == 1 and "pip install peft-trl-ext" in card and "import peft_ext" in card
    assert f'AutoPeftModelForCausalLM.from_pretrained("{REPO}", revision="dev")' in card and "`MORA`" in card
    data = ModelCard(card).data
    assert data.library_name == "peft" and {"mora", "toy"} <= set(data.tags)
    assert "- PEFT " in card  # PEFT's own card is kept, not replaced by a generic one

    adapter = tmp_path / "downloaded"
    adapter.mkdir()
    for name, content in files.items():
        (adapter / name).write_bytes(content)
    reloaded = PeftModel.from_pretrained(base_model(), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_push_to_hub_defaults_match_transformers(hub):
    peft_ext.push_to_hub(mora_model(), REPO)
    assert hub["create_repo"] == dict(repo_id=REPO, private=None, token=None, exist_ok=True)
    assert "create_branch" not in hub
    assert hub["upload_folder"]["revision"] is None and hub["upload_folder"]["create_pr"] is False


def test_push_to_hub_refuses_what_it_would_otherwise_ignore_before_touching_the_hub(hub):
    model = mora_model()
    with pytest.raises(
        TypeError, match=r"unexpected keyword argument\(s\) \['safe_serialisation'\].*safe_serialization"
    ):
        peft_ext.push_to_hub(model, REPO, safe_serialisation=False)  # misspelt
    with pytest.raises(TypeError, match="takes a PeftModel .* got LlamaForCausalLM"):
        peft_ext.push_to_hub(model.get_base_model(), REPO)
    with pytest.raises(ValueError, match="is_main_process=False"):
        peft_ext.push_to_hub(model, REPO, is_main_process=False)
    assert hub == {}


def test_save_pretrained_adds_the_section_and_passes_its_keywords(tmp_path):
    model = mora_model()
    peft_ext.save_pretrained(model, tmp_path / "out", safe_serialization=True, selected_adapters=["default"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.count(SECTION_HEADING) == 1 and "library_name: peft" in card
    assert 'AutoPeftModelForCausalLM.from_pretrained("<this repo or folder>")' in card
    peft_ext.save_pretrained(model, tmp_path / "out")  # saving again refreshes the section, never duplicates it
    assert (tmp_path / "out" / "README.md").read_text().count(SECTION_HEADING) == 1
    peft_ext.save_pretrained(model, tmp_path / "other", is_main_process=False)
    assert not (tmp_path / "other" / "README.md").exists()
    with pytest.raises(TypeError, match="unexpected keyword"):
        peft_ext.save_pretrained(model, tmp_path / "out", max_shard_sise="1GB")


def test_the_models_own_methods_are_peft_s(tmp_path):
    """``import peft_ext`` patches nothing: ``model.save_pretrained`` writes PEFT's card, without the section."""
    model = mora_model()
    model.save_pretrained(tmp_path / "plain")
    card = (tmp_path / "plain" / "README.md").read_text()
    assert "library_name: peft" in card and SECTION_HEADING not in card
    assert add_usage_to_model_card(tmp_path / "plain", model, model_id=REPO)
    card = (tmp_path / "plain" / "README.md").read_text()
    assert card.startswith("---") and "library_name: peft" in card and card.count(SECTION_HEADING) == 1


def test_plain_peft_adapters_get_peft_s_card_only(hub, tmp_path):
    lora = get_peft_model(base_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert peft_ext_types(lora) == []
    peft_ext.save_pretrained(lora, tmp_path)
    assert "peft-trl-ext" not in (tmp_path / "README.md").read_text()
    peft_ext.push_to_hub(lora, REPO)
    assert b"peft-trl-ext" not in hub["files"]["README.md"]
    assert not add_usage_to_model_card(tmp_path, lora)
