"""``python -m peft_ext.subnet diff`` validates safetensors headers and reads every dtype safetensors writes."""

import json
import re
import struct

import pytest
import torch
from safetensors.torch import save_file

from peft_ext.subnet import load_masks
from peft_ext.subnet.__main__ import main


def write_raw(path, header: dict, data: bytes):
    """A safetensors file written by hand, so its header can lie."""
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def diff(tmp_path, capsys, base, tuned):
    code = main(["diff", str(base), str(tuned), "--out", str(tmp_path / "masks.safetensors"), "--quiet"])
    return code, capsys.readouterr().err


FLOATS = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"dtype": "F32", "shape": [4], "data_offsets": [0, 4096]}, r"data_offsets \[0, 4096\] lie outside"),
        ({"dtype": "F32", "shape": [64], "data_offsets": [0, 16]}, r"needs 256 bytes but data_offsets \[0, 16\]"),
        ({"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 16]}, r"needs 4398046511104 bytes"),
        ({"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}, r"not a list of non-negative integers"),
    ],
)
def test_forged_headers_fail_with_a_clear_error(tmp_path, capsys, entry, message):
    base = write_raw(tmp_path / "base.safetensors", {"w": entry}, FLOATS)
    tuned = write_raw(tmp_path / "tuned.safetensors", {"w": entry}, FLOATS)
    code, err = diff(tmp_path, capsys, base, tuned)
    assert code == 2
    assert err.startswith("error: ") and "base.safetensors:w" in err
    assert re.search(message, err)


def test_header_size_past_the_end_of_the_file_fails_with_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "base.safetensors"
    bad.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    code, err = diff(tmp_path, capsys, bad, bad)
    assert code == 2 and "header claims 1000000000000 bytes" in err


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32, torch.uint64])
def test_fp8_and_unsigned_checkpoints_diff(tmp_path, capsys, dtype):
    before = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    after = before.clone()
    after[1, 2] += 4
    after[3, 0] += 8
    save_file({"w": before.to(dtype)}, tmp_path / "base.safetensors")
    save_file({"w": after.to(dtype)}, tmp_path / "tuned.safetensors")
    code, err = diff(tmp_path, capsys, tmp_path / "base.safetensors", tmp_path / "tuned.safetensors")
    assert code == 0, err
    expected = before.to(dtype).float() != after.to(dtype).float()
    assert expected.sum() == 2
    assert torch.equal(load_masks(tmp_path / "masks.safetensors")["w"], expected)
