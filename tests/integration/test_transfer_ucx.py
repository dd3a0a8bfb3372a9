"""The UCX plane between two processes on loopback: a receiver process checks what this process sends."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shared.transfer.base import FirstToken, PlaneUnavailable
from tests.unit.test_transfer_planes import prefill_blocks, random_rows, resolved

try:
    from shared.transfer.ucx import load_ucxx

    load_ucxx()
except PlaneUnavailable as e:
    pytest.skip(f"ucxx unavailable: {e}", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
SHAPES = {"a": (4, 300, 576), "b": (4, 77, 576)}

# The receiver: prints its address, receives both rooms at once into pages, compares them bit for bit
# with the rows the sender draws from the same seeds, prints the verdict.
RECEIVER = textwrap.dedent(f"""
    import asyncio, sys, torch
    from shared.transfer.registry import make_receiver
    from tests.unit.test_transfer_planes import bits, random_rows

    async def room(receiver, name, shape, seed):
        expected = random_rows(shape, seed=seed)
        pages = torch.full_like(expected, float("nan"))
        def write(start, rows):
            pages[:, start:start + rows.shape[1]] = rows
        first, nbytes = await receiver.receive(name, shape[1], write, 20.0)
        return torch.equal(bits(pages), bits(expected)), first.token_id, nbytes

    async def main():
        receiver = make_receiver("ucx", host="127.0.0.1")
        await receiver.start()
        print(receiver.address, flush=True)
        shapes = {SHAPES!r}
        results = await asyncio.gather(*(room(receiver, n, s, i) for i, (n, s) in enumerate(shapes.items())))
        print("RESULT", results, flush=True)
        await receiver.close()

    asyncio.run(main())
""")


def test_ucx_between_processes() -> None:
    proc = subprocess.Popen([sys.executable, "-c", RECEIVER], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        address = proc.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else address

        async def send() -> list[int]:
            from shared.transfer.registry import make_sender

            sender = make_sender("ucx", max_chunk_bytes=2**20)
            try:
                return await asyncio.wait_for(asyncio.gather(*(
                    sender.send(name, address, prefill_blocks(random_rows(shape, seed=i)), resolved(FirstToken(10 + i)))
                    for i, (name, shape) in enumerate(SHAPES.items()))), 30.0)
            finally:
                await sender.close()

        sent = asyncio.run(send())
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    result = next(line for line in out.splitlines() if line.startswith("RESULT"))
    expected = [(True, 10 + i, nbytes) for i, nbytes in enumerate(sent)]
    assert result == f"RESULT {expected}"
