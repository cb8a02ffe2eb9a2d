"""Mask files and checkpoint reading.

A masks file is a safetensors file with one tensor per weight, keyed by the parameter name
(``model.layers.0.self_attn.q_proj.weight``), encoded as in :mod:`peft_ext.subnet.ops` (sorted
flat indices or a packed bitmap). The header metadata records each weight's shape and encoding,
so a file can be checked against a model without loading it.

:class:`CheckpointReader` reads (sharded) safetensors checkpoints one tensor, or one slice of a
tensor, at a time with plain file reads instead of memory mapping, so the memory a reader holds is
exactly what it returns.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import ops

MASKS_FORMAT = "peft_ext.subnet.masks/1"

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# --------------------------------------------------------------------------- mask files
def save_encoded_masks(
    encoded: Mapping[str, tuple[str, torch.Tensor, tuple[int, ...]]], path: str | os.PathLike, info: dict | None = None
) -> None:
    """Write already encoded masks ``{name: (encoding, tensor, shape)}`` to ``path``."""
    header = {name: {"shape": list(shape), "encoding": enc} for name, (enc, _, shape) in encoded.items()}
    metadata = {"format": MASKS_FORMAT, "masks": json.dumps(header), "info": json.dumps(info or {})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({name: t.contiguous().cpu() for name, (_, t, _) in encoded.items()}, str(path), metadata=metadata)


def save_masks(
    masks: Mapping[str, torch.Tensor], path: str | os.PathLike, encoding: str = "auto", info: dict | None = None
) -> dict[str, int]:
    """Save boolean masks ``{parameter name: bool tensor}``; returns the stored bytes per name.

    Example:
        ```py
        >>> save_masks({"model.layers.0.mlp.up_proj.weight": torch.rand(8, 4) > 0.5}, "masks.safetensors")
        ```
    """
    encoded = {}
    for name, mask in masks.items():
        enc, tensor = ops.encode_indices(ops.mask_to_indices(mask), mask.numel(), encoding)
        encoded[name] = (enc, tensor, tuple(mask.shape))
    save_encoded_masks(encoded, path, info)
    return {name: t.numel() * t.element_size() for name, (_, t, _) in encoded.items()}


class MaskFile:
    """Lazy reader of a masks file: shapes from the header, one mask decoded (and validated) on demand.

    Example:
        ```py
        >>> masks = MaskFile("masks.safetensors")
        >>> masks.shape("model.layers.0.mlp.up_proj.weight"), masks.indices("model.layers.0.mlp.up_proj.weight")[:5]
        ```
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        with safe_open(self.path, framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format") != MASKS_FORMAT:
            raise ValueError(
                f"{self.path} is not a masks file (metadata format={metadata.get('format')!r}, "
                f"expected {MASKS_FORMAT!r}); create one with `python -m peft_ext.subnet diff` or save_masks()."
            )
        self._header = json.loads(metadata["masks"])
        self.info = json.loads(metadata.get("info", "{}"))

    def names(self) -> list[str]:
        return list(self._header)

    def __contains__(self, name: str) -> bool:
        return name in self._header

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def encoded(self, name: str) -> tuple[str, torch.Tensor]:
        with safe_open(self.path, framework="pt") as f:
            return self._header[name]["encoding"], f.get_tensor(name)

    def indices(self, name: str) -> torch.Tensor:
        """Sorted flat int64 indices of mask ``name``, validated against its recorded shape."""
        numel = 1
        for d in self.shape(name):
            numel *= d
        encoding, tensor = self.encoded(name)
        return ops.decode_indices(encoding, tensor, numel, where=f"{self.path}:{name}")

    def mask(self, name: str) -> torch.Tensor:
        return ops.indices_to_mask(self.indices(name), self.shape(name))

    def stored_nbytes(self, name: str) -> int:
        _, tensor = self.encoded(name)
        return tensor.numel() * tensor.element_size()


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load every mask of a masks file as dense boolean tensors."""
    masks = MaskFile(path)
    return {name: masks.mask(name) for name in masks.names()}


# --------------------------------------------------------------------------- name matching
def find_mask_name(names, module_name: str) -> str | None:
    """The mask among ``names`` that belongs to module ``module_name``, or None.

    Masks are keyed by parameter names (``...q_proj.weight``) which may carry a different wrapper
    prefix than the module (``base_model.model.``, ``_orig_mod.``); the match is exact first, then
    by a unique suffix on ``.`` boundaries.
    """
    names = list(names)
    for candidate in (f"{module_name}.weight", module_name):
        if candidate in names:
            return candidate
    stems = {(n[: -len(".weight")] if n.endswith(".weight") else n): n for n in names}
    hits = [n for stem, n in stems.items() if stem.endswith("." + module_name) or module_name.endswith("." + stem)]
    if len(hits) > 1:
        raise ValueError(
            f"module {module_name!r} matches several masks {hits[:4]}; key the masks by full parameter names."
        )
    return hits[0] if hits else None


# --------------------------------------------------------------------------- checkpoints
def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: a file, or a folder with one file or a sharded index."""
    path = Path(path)
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(
            f"no safetensors checkpoint at {str(path)!r}; pass a model folder saved with save_pretrained "
            "(model.safetensors or a sharded model.safetensors.index.json) or a .safetensors file."
        )
    return found


def _read_header(file: Path) -> tuple[int, dict]:
    """Parse and validate a safetensors header against the file: ``(data start, {name: entry})``.

    Every entry must have a known dtype, a shape of non-negative integers and data offsets inside
    the file whose length is exactly ``numel * itemsize``, so later reads never go past the data
    or allocate from a forged shape.
    """
    file_size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(
                f"{file} is not a safetensors file: it is {file_size} bytes, shorter than the header size."
            )
        size = int.from_bytes(prefix, "little")
        if size > file_size - 8:
            raise ValueError(
                f"{file}: the header claims {size} bytes but the file has {file_size - 8} after the size field; "
                "the file is truncated or not a safetensors file."
            )
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{file}: the safetensors header is not valid JSON ({err}).") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: the safetensors header is not a JSON object.")
    header.pop("__metadata__", None)
    data_size = file_size - 8 - size
    for name, entry in header.items():
        where = f"{file}:{name}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise ValueError(f"{where}: header entry {entry!r} lacks dtype, shape or data_offsets.")
        if entry["dtype"] not in _DTYPES:
            raise ValueError(
                f"{where} has dtype {entry['dtype']!r}, which this reader does not support (supported: {sorted(_DTYPES)})."
            )
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"{where}: shape {shape!r} is not a list of non-negative integers.")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise ValueError(
                f"{where}: data_offsets {offsets!r} lie outside the {data_size} data bytes of the file; "
                "the file is truncated or corrupt."
            )
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * _DTYPES[entry["dtype"]].itemsize
        if nbytes != offsets[1] - offsets[0]:
            raise ValueError(
                f"{where}: shape {shape} of {entry['dtype']} needs {nbytes} bytes but data_offsets {offsets} "
                f"hold {offsets[1] - offsets[0]}; the header is corrupt."
            )
    return 8 + size, header


class CheckpointReader:
    """Streams the tensors of a (sharded) safetensors checkpoint without memory mapping.

    Example:
        ```py
        >>> reader = CheckpointReader("path/to/model")
        >>> for name in reader.names(): w = reader.tensor(name)
        ```
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.files = checkpoint_files(path)
        self._where: dict[str, tuple[Path, int, dict]] = {}
        for file in self.files:
            offset, header = _read_header(file)
            for name, entry in header.items():
                self._where[name] = (file, offset, entry)

    def names(self) -> list[str]:
        """Tensor names, grouped by shard (so iterating them streams one shard after another)."""
        return list(self._where)

    def file_of(self, name: str) -> Path:
        return self._where[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][2]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._where[name][2]["dtype"]]

    def numel(self, name: str) -> int:
        numel = 1
        for d in self.shape(name):
            numel *= d
        return numel

    def read_flat(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Entries ``[start, stop)`` of the flattened tensor, read straight from the file."""
        file, offset, entry = self._where[name]
        dtype = _DTYPES[entry["dtype"]]
        stop = self.numel(name) if stop is None else stop
        itemsize = torch.empty((), dtype=dtype).element_size()
        buffer = bytearray((stop - start) * itemsize)
        with open(file, "rb") as f:
            f.seek(offset + entry["data_offsets"][0] + start * itemsize)
            read = f.readinto(buffer)
        if read != len(buffer):
            raise ValueError(
                f"{file}:{name}: expected {len(buffer)} bytes, read {read}; the file changed or is truncated."
            )
        if not buffer:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype)

    def read_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Read entries ``[start, start + out.numel())`` into the preallocated flat tensor ``out``.

        Reusing one buffer per reader keeps the allocator from growing the heap chunk after chunk.
        """
        file, offset, entry = self._where[name]
        if out.dtype != _DTYPES[entry["dtype"]]:
            raise ValueError(f"{name} is {entry['dtype']}, buffer is {out.dtype}.")
        with open(file, "rb") as f:
            f.seek(offset + entry["data_offsets"][0] + start * out.element_size())
            read = f.readinto(memoryview(out.view(torch.uint8).numpy()))
        if read != out.numel() * out.element_size():
            raise ValueError(
                f"{file}:{name}: expected {out.numel() * out.element_size()} bytes, read {read}; the file "
                "changed or is truncated."
            )
        return out

    def tensor(self, name: str) -> torch.Tensor:
        return self.read_flat(name).view(self.shape(name))

    def chunks(self, name: str, chunk_numel: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, flat slice)`` pairs covering the tensor in chunks of ``chunk_numel`` entries."""
        numel = self.numel(name)
        for start in range(0, numel, chunk_numel):
            yield start, self.read_flat(name, start, min(numel, start + chunk_numel))
