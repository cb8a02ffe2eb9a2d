"""TRL's own vLLM weight sync, run without a vLLM server: the tensors GRPO would push, by name.

``VLLMGeneration._iter_named_params`` is private TRL API (trl 1.16, ``trl/generation/vllm_generation.py``): it
gathers the parameters under ZeRO-3, merges the PEFT adapters, yields every base weight under the name vLLM
expects, and unmerges. Building the object with ``__new__`` skips ``_init_vllm`` (which starts vLLM); the
attributes set here are the ones that method reads. Pinned by ``test_vllm_sync.py`` and ``test_engines.py``.
"""

from __future__ import annotations


def pushed_weights(model, accelerator) -> dict:
    """``{vLLM name: tensor}`` that TRL's weight sync pushes for ``model`` (copied as they are yielded)."""
    from trl.distributed import DistributedBackend
    from trl.generation.vllm_generation import VLLMGeneration

    sync = VLLMGeneration.__new__(VLLMGeneration)
    sync.model, sync.accelerator, sync._dist = model, accelerator, DistributedBackend(accelerator)
    # The yielded tensors are the live (merged) weights: copy each before the generator unmerges.
    return {name: tensor.detach().clone().cpu() for name, tensor in sync._iter_named_params()}
