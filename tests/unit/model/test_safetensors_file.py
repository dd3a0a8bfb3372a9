"""The positioned-read safetensors reader: the same tensors as the safetensors library, clear errors otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moemesh.model.safetensors_file import SafetensorsError, SafetensorsFile


def test_reads_what_the_library_reads_in_every_dtype(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {f"t.{dtype}".replace("torch.", ""): (torch.randn(3, 5, 7, generator=g) * 10).to(dtype)
               for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int64,
                             torch.int8, torch.uint8)}
    tensors["empty"] = torch.empty(0, 4)
    tensors["scalar"] = torch.tensor(3.5)
    path = tmp_path / "a.safetensors"
    save_file(tensors, str(path))
    with SafetensorsFile(path) as mine, safe_open(path, framework="pt") as lib:
        assert sorted(mine.keys()) == sorted(lib.keys()) == sorted(tensors)
        for name in tensors:
            a, b = mine.get_tensor(name), lib.get_tensor(name)
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b)


def test_broken_files_fail_clearly(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(path))
    with SafetensorsFile(path) as f, pytest.raises(SafetensorsError, match="no tensor nope"):
        f.get_tensor("nope")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with SafetensorsFile(cut) as f, pytest.raises(SafetensorsError, match="cut short"):
        f.get_tensor("w")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(SafetensorsError, match="not a safetensors header"):
        SafetensorsFile(junk)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01")
    with pytest.raises(SafetensorsError, match="too short"):
        SafetensorsFile(tiny)
