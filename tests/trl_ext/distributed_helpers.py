"""Test helpers for multi-process checks: launch a script on several CPU processes (gloo), set up an engine, save.

``accelerate launch --cpu --num_processes 2`` can silently run a single process on some
machines, so this uses ``torchrun`` and the launched script should assert the world size.

This file holds every CPU-only work-around the engine tests need (DeepSpeed ZeRO and FSDP2 on gloo,
see :func:`configure_engine`); the library itself never needs them, as on GPUs ``accelerate launch
--config_file recipes/accelerate_configs/<engine>.yaml`` sets the engine up.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENGINES = ("ddp", "zero2", "zero3", "fsdp2")
REPO_ROOT = Path(__file__).resolve().parents[2]


def run_distributed(
    script: str, *args: str, nproc: int = 2, timeout: float = 600, engines: bool = False
) -> subprocess.CompletedProcess:
    """Run ``script`` under ``torchrun --nproc_per_node nproc`` on CPU; raise with each process's output if it fails.

    By default the processes train with accelerate's plain CPU data parallelism. With ``engines=True`` the
    script picks an engine of :data:`ENGINES` with :func:`configure_engine` before building each trainer.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    # The workers run a script, so the repository root is not on their path; the recipes are not installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    # A worker killed by a signal (an abort in a C++ thread, a segfault) then prints every thread's Python stack.
    env["PYTHONFAULTHANDLER"] = "1"
    if engines:
        # DeepSpeed would probe for a GPU and fail on this machine; its CPU accelerator runs the gloo backend.
        env["DS_ACCELERATOR"] = "cpu"
        env.pop("ACCELERATE_USE_CPU", None)  # set per engine by configure_engine
    else:
        env["ACCELERATE_USE_CPU"] = "true"
    with tempfile.TemporaryDirectory(prefix="torchrun-logs-") as logs:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
        # Each worker's output also goes to its own file, so that a failure can show every rank's last words.
        cmd += ["--master_addr=127.0.0.1", f"--master_port={_free_port()}", f"--log-dir={logs}", "--tee=3"]
        cmd += [script, *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            ranks = "".join(
                f"\n--- {log.relative_to(logs)} ---\n{_last_lines(log.read_text(errors='replace'))}"
                for log in sorted(Path(logs).rglob("*.log"))
            )
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({proc.returncode}):{ranks}\n--- torchrun ---\n{_last_lines(proc.stderr)}"
            )
    return proc


_NOISE = re.compile(r"it/s\]|examples/s\]|^\s*$|reducer\.cpp|kernels-community|real_accelerator\.py")


def _last_lines(text: str, keep: int = 40) -> str:
    """The last ``keep`` lines of a worker's output, without progress bars and known harmless warnings."""
    lines = [line for line in text.replace("\r", "\n").splitlines() if not _NOISE.search(line)]
    return "\n".join(lines[-keep:])


def save_trained_state(trainer, path: str) -> None:
    """On the main process, save ``trainer``'s parameters and its first logged loss (for 1-vs-N comparisons)."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    state = {n: p.detach().contiguous() for n, p in trainer.model.named_parameters()}
    state["loss"] = torch.tensor([trainer.state.log_history[0]["loss"]])
    save_file(state, path)


def shutdown() -> None:
    """End a worker once its results are written: tear the process group down, then exit at once.

    The interpreter's own teardown is skipped: a C++ thread still alive as it unloads modules (gloo's, a
    DataLoader's) can abort a worker that has finished its work, and the test would fail on a signal after
    every result was written. Anything that fails before this call still fails the run.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


ACCELERATE_CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "accelerate_configs"


def shipped_config(engine: str) -> dict:
    """The engine section of ``recipes/accelerate_configs/<engine>.yaml``, as accelerate reads it."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ACCELERATE_CONFIGS / f"{engine}.yaml"))
    return config.deepspeed_config if engine.startswith("zero") else config.fsdp_config


def deepspeed_config(engine: str) -> dict:
    """The DeepSpeed config of the shipped ``zero2.yaml``/``zero3.yaml``, as ``TrainingArguments(deepspeed=...)``.

    Precision stays float32 (the yaml's bf16 is for GPUs) so that engines can be compared exactly.
    """
    shipped = shipped_config(engine)
    zero = {"stage": shipped["zero_stage"]}
    for kind in ("optimizer", "param"):
        if shipped.get(f"offload_{kind}_device", "none") != "none":
            zero[f"offload_{kind}"] = {"device": shipped[f"offload_{kind}_device"]}
    if zero["stage"] == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = shipped.get("zero3_save_16bit_model", False)
        # Partition every parameter, as on real models: by default ZeRO-3 keeps tensors under 1e5 elements (all of
        # the toy models' adapters) whole on every rank, which would leave the partitioned paths untested.
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_allow_untested_optimizer": True,  # the tests step plain SGD so that a scale error shows in the weights
    }


def configure_engine(engine: str) -> None:
    """Set up the distributed state for ``engine`` on 2 CPU processes; call before building each trainer in a
    script launched by :func:`run_distributed`, and build the trainer with :func:`engine_args`.

    Work-arounds, none of which applies on GPUs:

    - accelerate picks its process-group backend from the device and finds none on CPU unless told
      ``cpu=True``, which in turn disables DeepSpeed and FSDP; it then counts 1 process. So the state is
      built here first with ``backend="gloo"``, and the trainer reuses it (``use_configured_state``).
    - DeepSpeed: accelerate turns the state into a DeepSpeed one only while ``ACCELERATE_USE_DEEPSPEED``
      is set as the state is built (``accelerate launch`` sets it from the config file).
    - FSDP2: accelerate applies FSDP only to a GPU-type distributed state and silently trains plain DDP on
      ``MULTI_CPU``; torch's ``fully_shard`` itself runs on gloo, so the state is reported as ``MULTI_GPU``.
    - Several trainers in one process: accelerate keeps one engine set-up per process (a second
      ``Accelerator`` may not take a DeepSpeed plugin, and FSDP's wrap class sticks to the first model), so
      the state is rebuilt here before each trainer. A training script runs one trainer and never needs this.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}; choose one of {ENGINES}.")
    from accelerate import PartialState
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedType
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    unset_hf_deepspeed_config()  # else the next model would still load under the previous trainer's ZeRO-3 init
    # A DeepSpeed Accelerator sets ACCELERATE_USE_DEEPSPEED=true for the rest of the process, which would turn the
    # next state into a DeepSpeed one whatever the engine.
    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        os.environ.pop(name, None)
    if engine == "ddp":  # accelerate's CPU data parallelism, as ``accelerate launch --cpu`` selects it
        os.environ["ACCELERATE_USE_CPU"] = "true"
        return
    os.environ.pop("ACCELERATE_USE_CPU", None)  # cpu=True makes accelerate ignore DeepSpeed and FSDP altogether

    if engine.startswith("zero"):
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        try:
            PartialState(backend="gloo")
        finally:
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    else:
        state = PartialState(backend="gloo")
        state.distributed_type = DistributedType.MULTI_GPU


def engine_args(engine: str) -> dict:
    """TrainingArguments fields selecting ``engine`` (after :func:`configure_engine`)."""
    if engine == "ddp":
        return {}
    extra = {"accelerator_config": {"use_configured_state": True}}
    if engine.startswith("zero"):
        return {"deepspeed": deepspeed_config(engine), **extra}
    return {"fsdp": "full_shard auto_wrap", "fsdp_config": shipped_config(engine), **extra}


def check_engine(trainer, engine: str, world: int = 2) -> None:
    """Assert that ``trainer`` really trained under ``engine`` on ``world`` processes (not a silent fallback)."""
    import torch.distributed as dist
    from accelerate.utils import DistributedType

    accelerator = trainer.accelerator
    assert dist.is_initialized() and dist.get_world_size() == world, f"world size {dist.get_world_size()} != {world}"
    assert accelerator.num_processes == world, accelerator.num_processes
    wrapped = trainer.model_wrapped
    expected = {
        "ddp": DistributedType.MULTI_CPU,
        "zero2": DistributedType.DEEPSPEED,
        "zero3": DistributedType.DEEPSPEED,
        "fsdp2": DistributedType.FSDP,
    }[engine]
    assert accelerator.distributed_type == expected, (engine, accelerator.distributed_type)
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        assert isinstance(wrapped, DistributedDataParallel), type(wrapped)
    elif engine.startswith("zero"):
        from deepspeed import DeepSpeedEngine

        assert isinstance(wrapped, DeepSpeedEngine), type(wrapped)
        assert wrapped.zero_optimization_stage() == int(engine[-1]), wrapped.zero_optimization_stage()
    else:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        assert accelerator.is_fsdp2, accelerator.state.fsdp_plugin
        assert isinstance(wrapped, FSDPModule), type(wrapped)
        assert all(isinstance(p, DTensor) for p in wrapped.parameters()), "unsharded parameters under FSDP2"
