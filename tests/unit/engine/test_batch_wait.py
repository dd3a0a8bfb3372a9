"""An idle engine's batch wait (`AsyncEngine(batch_wait_s=...)`, the workers' --batch-wait-ms): requests that arrive
within the wait of the first share its first step; without one the first steps alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from moemesh.engine.async_engine import AsyncEngine
from moemesh.engine.engine import Engine, EngineConfig
from moemesh.engine.sampling_params import SamplingParams


def _first_steps(model: Path, batch_wait_s: float, gap_s: float) -> list[list[str]]:
    """Two requests `gap_s` apart into an idle engine: the request ids of each step's outputs, in order."""
    engine = Engine(EngineConfig(model=str(model), dtype="float32", page_size=4, kv_cache_mb=8))
    steps: list[list[str]] = []
    step = engine.step

    def recorded():
        outputs = step()
        steps.append([o.request_id for o in outputs])
        return outputs

    engine.step = recorded

    async def run() -> None:
        aengine = AsyncEngine(engine, batch_wait_s=batch_wait_s)
        await aengine.start()
        params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)

        async def one(rid: str, prompt: list[int], delay: float) -> None:
            await asyncio.sleep(delay)
            async for _ in aengine.generate(prompt, params, rid):
                pass

        try:
            await asyncio.wait_for(asyncio.gather(one("a", [5, 6, 7, 8], 0), one("b", [9, 10, 11], gap_s)), 60)
        finally:
            await aengine.stop()

    asyncio.run(run())
    return steps


@pytest.mark.parametrize(("batch_wait_s", "together"), [(0.5, True), (0.0, False)])
def test_requests_arriving_within_the_wait_share_the_first_step(tiny_dir: Path, batch_wait_s: float,
                                                                 together: bool) -> None:
    steps = _first_steps(tiny_dir, batch_wait_s, gap_s=0.15)
    assert ("b" in steps[0]) is together, steps
    assert steps[0][0] == "a" and sum(s.count("a") for s in steps) == sum(s.count("b") for s in steps) == 2


@pytest.mark.parametrize("value", ["-1", "2000", "soon"])
def test_a_bad_wait_is_refused_with_a_clear_message(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from moemesh.worker.engine_args import add_engine_arguments

    p = argparse.ArgumentParser()
    add_engine_arguments(p)
    assert p.parse_args(["--batch-wait-ms", "2.5"]).batch_wait_ms == 2.5
    with pytest.raises(SystemExit) as exc:
        p.parse_args(["--batch-wait-ms", value])
    assert exc.value.code == 2 and "--batch-wait-ms" in capsys.readouterr().err


def test_a_stop_during_the_wait_ends_it_at_once(tiny_dir: Path) -> None:
    import time

    engine = Engine(EngineConfig(model=str(tiny_dir), dtype="float32", page_size=4, kv_cache_mb=8))

    async def run() -> float:
        aengine = AsyncEngine(engine, batch_wait_s=30.0)
        await aengine.start()
        params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        first = asyncio.ensure_future(aengine.generate([5, 6, 7], params, "a").__anext__())
        await asyncio.sleep(0.2)  # the request is in, the engine thread waits for company
        t0 = time.monotonic()
        await aengine.stop()
        first.cancel()
        return time.monotonic() - t0

    assert asyncio.run(run()) < 2.0  # not the 30 s wait
