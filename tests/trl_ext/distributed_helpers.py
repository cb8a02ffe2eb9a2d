"""Test helpers for multi-process checks: launch a script on several CPU processes (gloo), save, tear down.

``accelerate launch --cpu --num_processes 2`` can silently run a single process on some
machines, so this uses ``torchrun`` and the launched script should assert the world size.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(script: str, *args: str, nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``script`` under ``torchrun --nproc_per_node nproc`` on CPU; raise with its output if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", script, *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


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
    """Tear the process group down before exit: a gloo thread alive at interpreter exit can abort the process."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
