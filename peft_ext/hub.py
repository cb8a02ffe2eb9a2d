"""Model cards and Hub uploads that tell readers how to load this package's adapter types.

Plain PEFT cannot load an adapter whose ``peft_type`` this package registers (``MORA``, ...):
the reader must install the package and import it first. So for models that carry such an
adapter, :func:`install_hub_hooks` makes PEFT's own entry points say so:

- ``PeftModel.save_pretrained`` writes a README.md that ends with a "Loading this adapter"
  section (``pip install peft-trl-ext``, ``import peft_ext``);
- ``PeftModel.push_to_hub`` uploads the adapter with that card via :func:`push_to_hub`.
  (The inherited ``transformers`` implementation replaces PEFT's card with a generic one.)

Models with only built-in PEFT adapters are left exactly as PEFT handles them.
"""

from __future__ import annotations

import os
import tempfile

PACKAGE_NAME = "peft-trl-ext"
SECTION_HEADING = "## Loading this adapter"


def peft_ext_types(model) -> list[str]:
    """Sorted PEFT types of ``model``'s adapters that come from this package (empty if none)."""
    configs = getattr(model, "peft_config", None) or {}
    return sorted({str(c.peft_type.value) for c in configs.values() if type(c).__module__.startswith("peft_ext.")})


def usage_section(peft_types: list[str], model_id: str = "<this repo or folder>", task_type: str | None = None) -> str:
    """Markdown section telling a reader which package to install and import to load the adapter.

    Example:
        ```py
        >>> print(usage_section(["MORA"], "me/my-adapter").splitlines()[0])
        ## Loading this adapter
        ```
    """
    auto_cls = "AutoPeftModelForCausalLM" if task_type == "CAUSAL_LM" else "AutoPeftModel"
    types = ", ".join(f"`{t}`" for t in peft_types)
    return (
        f"{SECTION_HEADING}\n\n"
        f"This adapter uses the PEFT type {types}, which is provided by the `{PACKAGE_NAME}` package, not by PEFT "
        "itself. Install the package and import `peft_ext` before loading the adapter; the import registers "
        "the type with PEFT:\n\n"
        f"```bash\npip install {PACKAGE_NAME}\n```\n\n"
        "```python\n"
        "import peft_ext  # registers the adapter type with PEFT\n"
        f"from peft import {auto_cls}\n\n"
        f'model = {auto_cls}.from_pretrained("{model_id}")\n'
        "```\n"
    )


def add_usage_to_model_card(save_directory: str, model, model_id: str | None = None) -> bool:
    """Append (or refresh) the usage section in ``save_directory/README.md``; False if not needed."""
    types = peft_ext_types(model)
    if not types:
        return False
    path = os.path.join(save_directory, "README.md")
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    text = text.split(SECTION_HEADING)[0].rstrip()
    task_type = next(iter(model.peft_config.values())).task_type
    task_type = getattr(task_type, "value", task_type)
    section = usage_section(types, model_id or "<this repo or folder>", task_type)
    with open(path, "w", encoding="utf-8") as f:
        f.write((text + "\n\n" if text else "") + section)
    return True


def push_to_hub(
    model,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
    **kwargs,
):
    """Upload ``model``'s adapter(s) and a model card that explains how to load them.

    Saves with ``model.save_pretrained`` into a temporary folder, writes the card (PEFT's card
    plus the usage section, and ``tags``), then uploads the folder with ``HfApi.upload_folder``.
    An existing README on the Hub is replaced. Other keyword arguments (e.g. ``max_shard_size``)
    are accepted for compatibility and ignored.

    Example:
        ```py
        >>> import peft_ext
        >>> model.push_to_hub("me/toy-mora")  # doctest: +SKIP
        ```
    """
    from huggingface_hub import HfApi, ModelCard

    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        add_usage_to_model_card(folder, model, model_id=repo_id)
        if tags:
            card = ModelCard.load(os.path.join(folder, "README.md"))
            card.data.tags = sorted(set(card.data.tags or []) | set(tags))
            card.save(os.path.join(folder, "README.md"))
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or "Upload adapter",
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )


def install_hub_hooks() -> None:
    """Route ``PeftModel.save_pretrained``'s card and ``PeftModel.push_to_hub`` through this module.

    Idempotent. Only models that carry an adapter type of this package are affected.
    """
    from peft import PeftModel

    if getattr(PeftModel, "_peft_ext_hub_hooks", False):
        return
    original_card = PeftModel.create_or_update_model_card
    original_push = PeftModel.push_to_hub

    def create_or_update_model_card(self, output_dir: str):
        original_card(self, output_dir)
        add_usage_to_model_card(output_dir, self)

    def push(self, repo_id: str, **kwargs):
        if peft_ext_types(self):
            return push_to_hub(self, repo_id, **kwargs)
        return original_push(self, repo_id, **kwargs)

    create_or_update_model_card.__doc__ = original_card.__doc__
    push.__doc__ = (
        original_push.__doc__ or ""
    ) + "\n\nAdapters of peft_ext types go through peft_ext.hub.push_to_hub."
    PeftModel.create_or_update_model_card = create_or_update_model_card
    PeftModel.push_to_hub = push
    PeftModel._peft_ext_hub_hooks = True
