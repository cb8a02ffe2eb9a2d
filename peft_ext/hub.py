"""Model cards and Hub uploads that tell readers how to load this package's adapter types.

Plain PEFT cannot load an adapter whose ``peft_type`` this package registers (``MORA``, ``SUBNET``):
the reader must install the package and import it first. The functions here say so in the model
card, through calls you make explicitly:

- :func:`save_pretrained` is ``model.save_pretrained`` plus a "Loading this adapter" section in
  the README.md that PEFT writes;
- :func:`push_to_hub` uploads the adapter with that card, in one commit;
- :func:`add_usage_to_model_card` adds the section to any card already in a folder (for example
  the one ``Trainer.create_model_card`` writes).

Importing ``peft_ext`` changes nothing in ``PeftModel``: ``model.save_pretrained`` and
``model.push_to_hub`` stay exactly as PEFT and transformers define them, for every model.
"""

from __future__ import annotations

import inspect
import os
import tempfile

PACKAGE_NAME = "peft-trl-ext"
SECTION_HEADING = "## Loading this adapter"
# PeftModel.save_pretrained reads ``state_dict`` from its **kwargs (peft 0.21.2, peft/peft_model.py) and
# transformers' push_to_hub passes ``max_shard_size`` to it; every other keyword must be a named parameter.
_SAVE_KWARGS_READ_FROM_KWARGS = ("state_dict", "max_shard_size")


def peft_ext_types(model, adapter_names: list[str] | None = None) -> list[str]:
    """Sorted PEFT types of ``model``'s adapters (those in ``adapter_names``, default all) that come from this package."""
    configs = getattr(model, "peft_config", None) or {}
    return sorted(
        {
            str(getattr(c.peft_type, "value", c.peft_type))
            for name, c in configs.items()
            if (adapter_names is None or name in adapter_names) and type(c).__module__.startswith("peft_ext.")
        }
    )


def usage_section(
    peft_types: list[str],
    model_id: str = "<this repo or folder>",
    task_type: str | None = None,
    revision: str | None = None,
) -> str:
    """Markdown section telling a reader which package to install and import to load the adapter.

    Example:
        ```py
        >>> print(usage_section(["MORA"], "me/my-adapter").splitlines()[0])
        ## Loading this adapter
        ```
    """
    auto_cls = "AutoPeftModelForCausalLM" if task_type == "CAUSAL_LM" else "AutoPeftModel"
    types = ", ".join(f"`{t}`" for t in peft_types)
    where = f'"{model_id}"' + (f', revision="{revision}"' if revision else "")
    return (
        f"{SECTION_HEADING}\n\n"
        f"This adapter uses the PEFT type {types}, which is provided by the `{PACKAGE_NAME}` package, not by PEFT "
        "itself. Install the package and import `peft_ext` before loading the adapter; the import registers "
        "the type with PEFT:\n\n"
        f"```bash\npip install {PACKAGE_NAME}\n```\n\n"
        "```python\n"
        "import peft_ext  # registers the adapter type with PEFT\n"
        f"from peft import {auto_cls}\n\n"
        f"model = {auto_cls}.from_pretrained({where})\n"
        "```\n"
    )


def add_usage_to_model_card(
    save_directory: str,
    model,
    model_id: str | None = None,
    adapter_names: list[str] | None = None,
    revision: str | None = None,
) -> bool:
    """Append (or refresh) the usage section in ``save_directory/README.md``; False if none is needed.

    The section is needed when one of ``model``'s adapters (those in ``adapter_names``, default all) has
    a type of this package. ``model_id`` (and ``revision``) is what the card's example loads from.

    Example:
        ```py
        >>> trainer.save_model(out)  # doctest: +SKIP
        >>> peft_ext.hub.add_usage_to_model_card(out, trainer.model)  # doctest: +SKIP
        True
        ```
    """
    types = peft_ext_types(model, adapter_names)
    if not types:
        return False
    path = os.path.join(save_directory, "README.md")
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    text = text.split(SECTION_HEADING)[0].rstrip()
    configs = [c for name, c in model.peft_config.items() if adapter_names is None or name in adapter_names]
    task_type = getattr(configs[0].task_type, "value", configs[0].task_type)
    section = usage_section(types, model_id or "<this repo or folder>", task_type, revision)
    with open(path, "w", encoding="utf-8") as f:
        f.write((text + "\n\n" if text else "") + section)
    return True


def _check_model_and_save_kwargs(model, save_kwargs: dict, caller: str) -> None:
    """Refuse what ``model.save_pretrained`` would silently ignore: a non-PEFT model or an unknown keyword."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(
            f"peft_ext.{caller} takes a PeftModel (from get_peft_model or PeftModel.from_pretrained), got "
            f"{type(model).__name__}; for a Trainer pass trainer.model."
        )
    params = inspect.signature(type(model).save_pretrained).parameters
    known = {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    known -= {"self", "save_directory"}
    known |= set(_SAVE_KWARGS_READ_FROM_KWARGS)
    unknown = sorted(set(save_kwargs) - known)
    if unknown:
        raise TypeError(
            f"peft_ext.{caller} got unexpected keyword argument(s) {unknown}; {type(model).__name__}.save_pretrained "
            f"takes {sorted(known)}."
        )


def save_pretrained(model, save_directory: str, **kwargs) -> None:
    """``model.save_pretrained(save_directory, **kwargs)``, then the usage section in its model card.

    Every keyword argument goes to ``model.save_pretrained`` (``selected_adapters``,
    ``safe_serialization``, ``save_embedding_layers``, ``is_main_process``, ``state_dict``, ...); one
    that it does not take is refused rather than ignored. Nothing is written where
    ``is_main_process=False``.

    Example:
        ```py
        >>> import peft_ext
        >>> peft_ext.save_pretrained(model, "my-mora-adapter")  # doctest: +SKIP
        ```
    """
    _check_model_and_save_kwargs(model, kwargs, "save_pretrained")
    model.save_pretrained(save_directory, **kwargs)
    if kwargs.get("is_main_process", True):
        add_usage_to_model_card(save_directory, model, adapter_names=kwargs.get("selected_adapters"))


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
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
    **save_kwargs,
):
    """Upload ``model``'s adapter(s) and a model card that explains how to load them; returns the commit info.

    Takes the keyword arguments of ``PeftModel.push_to_hub`` (transformers' ``PushToHubMixin``) and
    passes each where that method does: ``private`` and ``token`` to ``HfApi.create_repo``;
    ``commit_message``, ``commit_description``, ``token``, ``revision`` and ``create_pr`` to the
    upload (a ``revision`` branch is created first if missing); ``max_shard_size`` to
    ``model.save_pretrained`` (PEFT writes adapters unsharded). Further keywords go to
    ``model.save_pretrained`` too (``selected_adapters``, ``safe_serialization``, ``state_dict``, ...);
    one it does not take is refused. The card is PEFT's card plus ``tags`` and, for adapters of this
    package's types, the usage section; it replaces a README already in the repo.

    Example:
        ```py
        >>> import peft_ext
        >>> peft_ext.push_to_hub(model, "me/toy-mora", private=True)  # doctest: +SKIP
        ```
    """
    from huggingface_hub import HfApi, ModelCard
    from huggingface_hub.errors import HfHubHTTPError

    _check_model_and_save_kwargs(model, save_kwargs, "push_to_hub")
    if not save_kwargs.get("is_main_process", True):
        raise ValueError("peft_ext.push_to_hub got is_main_process=False; call it on the main process only.")
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size, **save_kwargs)
        selected = save_kwargs.get("selected_adapters")
        on_branch = revision if revision and not revision.startswith("refs/pr") else None
        add_usage_to_model_card(folder, model, model_id=repo_id, adapter_names=selected, revision=on_branch)
        if tags:
            card = ModelCard.load(os.path.join(folder, "README.md"))
            card.data.tags = sorted(set(card.data.tags or []) | set(tags))
            card.save(os.path.join(folder, "README.md"))
        if revision is not None and not revision.startswith("refs/pr"):
            try:
                api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
            except HfHubHTTPError as error:
                # As transformers does: a PR to a repo we cannot write to may target a branch we cannot create.
                if not (create_pr and error.response is not None and error.response.status_code == 403):
                    raise
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or "Upload adapter",
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )
