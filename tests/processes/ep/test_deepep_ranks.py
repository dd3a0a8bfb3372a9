"""The DeepEP dispatcher across two rank processes (gloo with the `deep_ep` stand-in of
tests/unit/ep/test_ep_gpu_backends.py, or NCCL with the real package on two GPUs), and the Hopper benchmark's
clean skip on a machine without one.

The file doubles as the EP rank script: `python test_deepep_ranks.py PORT RANK WORLD MODE BACKEND OUT_DIR`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moemesh.ep import deepep
from tests.net import free_port
from tests.paths import ROOT
from tests.processes.ep.ranks import run_ranks
from tests.unit.ep.test_ep_gpu_backends import (
    BENCH,
    _fake_deep_ep,
    _importable,
    _run_ep_layer,
)

TIMEOUT_S = 60.0


@pytest.mark.parametrize("mode", ["normal", "low_latency"])
def test_deepep_dispatcher_across_two_ranks(tmp_path: Path, mode: str) -> None:
    _run_group(2, mode, "fake", tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2 or not _importable("deep_ep"),
                    reason="needs deep_ep and two CUDA GPUs")
@pytest.mark.parametrize("mode", ["normal", "low_latency"])
def test_deepep_dispatcher_on_two_gpus(tmp_path: Path, mode: str) -> None:
    _run_group(2, mode, "real", tmp_path)


def _run_group(world: int, mode: str, backend: str, out: Path) -> None:
    port = free_port()
    run_ranks(__file__, world, lambda rank: [str(port), str(rank), str(world), mode, backend, str(out)], out,
              TIMEOUT_S)
    for rank in range(world):
        got, ref = torch.load(out / f"rank{rank}.pt")
        for g, r in zip(got, ref, strict=True):
            assert g.shape == r.shape
            if r.numel():
                assert (g - r).abs().max() <= 2e-2 * r.abs().max().clamp(min=1), f"rank {rank}"


def _rank_main(port: int, rank: int, world: int, mode: str, backend: str, out_dir: str) -> None:
    real = backend == "real"
    if real:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
        sys.modules["deep_ep"] = _fake_deep_ep()
        deepep._require_cuda_nccl = lambda group: None
    dist.init_process_group("nccl" if real else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        got, ref = _run_ep_layer(None, rank, world, mode, seed=11, device="cuda" if real else "cpu")
        torch.save((got, ref), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# ---- the Hopper benchmark ------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available() and _importable("deep_gemm"),
                    reason="deep_gemm and CUDA are here: the script would run the real benchmark")
def test_bench_skips_cleanly_without_a_hopper_gpu() -> None:
    proc = subprocess.run([sys.executable, str(BENCH)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=""))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("skipped: "), proc.stdout


if __name__ == "__main__":
    _port, _rank, _world, _mode, _backend, _out = sys.argv[1:7]
    _rank_main(int(_port), int(_rank), int(_world), _mode, _backend, _out)
