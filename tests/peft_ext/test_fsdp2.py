"""MoRA and SUBNET under FSDP2 (``fully_shard``, 2 CPU processes with gloo) train exactly like 1 process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("_fsdp2_train.py")
REPO_ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=["subnet", "mora"])
def result(request, tmp_path_factory):
    """One torchrun of the script per method, read by both tests."""
    method = request.param
    out = tmp_path_factory.mktemp(method) / "result.json"
    env = {
        **os.environ,
        "PYTHONFAULTHANDLER": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(SCRIPT), method, str(out)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_fully_shard_matches_one_process_after_two_steps(result):
    assert result["moved"] > 1e-3  # the adapters really trained
    for loss, reference in zip(result["losses"], result["reference_losses"], strict=True):
        assert abs(loss - reference) <= 1e-5 * abs(reference), result
    assert result["trained_gap"] <= 1e-5, result
    assert result["base_gap"] == 0.0, result  # the frozen base weights are untouched


def test_sharded_weights_outside_the_fsdp_forward_are_refused_clearly(result):
    for what, message in result["refusals"].items():
        assert message is not None and "needs the full base weight, but it is a sharded DTensor" in message, (
            what,
            message,
        )
