"""What every recipe shares: model and dataset resolution with the embedded toy defaults."""

from __future__ import annotations

import os

from datasets import Dataset, load_dataset
from trl import ScriptArguments

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def resolve_model(model_name_or_path: str | None) -> str:
    """The given model name or path, or the embedded pretrained toy model when it is None."""
    if model_name_or_path:
        return model_name_or_path
    from trl_ext.toy import pretrained_toy_model_path

    return pretrained_toy_model_path()


def resolve_dataset(script_args: ScriptArguments, default: Dataset | None) -> Dataset:
    """The training split of ``script_args.dataset_name`` (any path or Hub id), or ``default``."""
    if not script_args.dataset_name:
        return default
    return load_dataset(
        script_args.dataset_name, name=script_args.dataset_config, split=script_args.dataset_train_split
    )


def is_toy_run(script_args: ScriptArguments, model_name_or_path: str | None) -> bool:
    """Whether the run is on the embedded default, where held-out toy metrics are meaningful."""
    return not script_args.dataset_name and not model_name_or_path


def finish(trainer, script_args: ScriptArguments, results: dict) -> dict:
    """Save the model or adapter, push it to the Hub when asked, and add the log history to ``results``."""
    results["log_history"] = trainer.state.log_history
    trainer.save_model(trainer.args.output_dir)
    if trainer.args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return results
