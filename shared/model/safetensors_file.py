"""Reading single tensors out of a safetensors file, each with one positioned read of exactly its bytes.

`safetensors.safe_open` maps the whole file: every tensor read through it leaves its pages mapped into the
process until the file is closed, so a loader that keeps a checkpoint's files open counts all it has read
twice in its resident memory (the copy it keeps, and the mapped pages). An expert-parallel rank of a
DeepSeek-V3-sized model then peaks at twice its share. Reading each tensor's byte range into its own buffer
keeps a rank's memory at what it holds; the files' pages stay in the kernel's cache, shared and reclaimable.

The format: an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte offsets into the
data that follows), then the data.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
# A header larger than this is not a checkpoint's (real ones are a few MB at most).
_MAX_HEADER = 100 * 2**20


class SafetensorsError(ValueError):
    """The file is not a readable safetensors file, or lacks the tensor asked for."""


class SafetensorsFile:
    """One safetensors file, open for positioned reads; a context manager like `safe_open`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self._entries, self._data_start = self._read_header()
        except BaseException:
            os.close(self._fd)
            raise

    def _read_header(self) -> tuple[dict[str, dict], int]:
        raw = os.pread(self._fd, 8, 0)
        if len(raw) != 8:
            raise SafetensorsError(f"{self.path}: too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise SafetensorsError(f"{self.path}: header of {n} bytes is not a safetensors header")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{self.path}: malformed header: {e}") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: malformed header")
        header.pop("__metadata__", None)
        return header, 8 + n

    def keys(self) -> list[str]:
        return list(self._entries)

    def nbytes(self, name: str) -> int:
        """The bytes tensor `name` takes in the file (0 for a name it lacks or a malformed entry)."""
        try:
            start, end = (int(o) for o in self._entries[name]["data_offsets"])
        except (KeyError, TypeError, ValueError):
            return 0
        return max(0, end - start)

    def get_tensor(self, name: str) -> torch.Tensor:
        """The tensor `name`, read from disk into memory of its own."""
        entry = self._entries.get(name)
        if entry is None:
            raise SafetensorsError(f"{self.path} has no tensor {name}")
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = [int(d) for d in entry["shape"]]
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{self.path}: bad header entry for {name}: {e!r}") from None
        size = end - start
        expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if size != expected:
            raise SafetensorsError(f"{self.path}: {name} spans {size} bytes, its shape and dtype need {expected}")
        out = torch.empty(shape, dtype=dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()).cast("B") if size else memoryview(b"")
        done = 0
        while done < size:  # a read may return less than asked (large reads, signals)
            n = os.preadv(self._fd, [view[done:]], self._data_start + start + done)
            if n <= 0:
                raise SafetensorsError(f"{self.path}: {name} is cut short ({done} of {size} bytes)")
            done += n
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
