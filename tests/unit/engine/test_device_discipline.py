"""Every tensor the engine makes lives on the engine's device: the engine run on a simulated GPU
(tests/fake_cuda.py), where any CPU tensor meeting a CUDA one raises, as it would on a GPU.

With MOEMESH_TEST_REAL_CUDA=1 on a GPU machine (bench/gpu_check.sh) the same tests run on the real GPU; those
that test the simulator itself or need what only it provides skip, saying why."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moemesh.engine.engine import Engine, EngineConfig
from moemesh.engine.sampling_params import SamplingParams
from tests.fake_cuda import (
    CrossDevice,
    FakeCudaTensor,
    current_device_of_this_thread,
    fake_cuda,
    fake_cuda_in_this_thread,
    real_cuda,
    set_device_calls,
)
from tests.net import free_port
from tests.unit.engine.test_engine_pd import pd_generate


def _simulated_only(why: str) -> pytest.MarkDecorator:
    """Skip under MOEMESH_TEST_REAL_CUDA: the test needs the simulated device, for the reason `why`."""
    return pytest.mark.skipif(real_cuda(), reason=f"MOEMESH_TEST_REAL_CUDA is set: {why}")


@_simulated_only("tests the simulator itself (CrossDevice, FakeCudaTensor)")
def test_the_simulated_gpu_raises_where_a_real_one_does() -> None:
    with fake_cuda():
        a = torch.arange(6.0, device="cuda").view(2, 3)
        assert a.device.type == "cuda" and (a * 2).device.type == "cuda"
        assert a.sum().item() == 15.0 and a.tolist()[1] == [3.0, 4.0, 5.0]
        with pytest.raises(CrossDevice):
            a + torch.ones(2, 3)
        with pytest.raises(CrossDevice):
            torch.zeros(4, 3, device="cuda").index_put_((torch.tensor([0], device="cuda"),), torch.ones(1, 3))
        with pytest.raises(CrossDevice):
            a.index_select(0, torch.tensor([1]))
        # What CUDA allows: 0-dim CPU scalars, CPU indices in advanced indexing, copies between devices.
        assert (a + torch.tensor(1.0)).device.type == "cuda"
        assert a[torch.tensor([1])].tolist() == [[3.0, 4.0, 5.0]]
        b = torch.empty(2, 3, device="cuda").copy_(torch.ones(2, 3))
        assert b.sum().item() == 6.0
        back = a.cpu()
        assert type(back) is torch.Tensor and back.device.type == "cpu"
        assert torch.equal(back, torch.arange(6.0).view(2, 3))
        assert isinstance(torch.ones(2).to("cuda"), FakeCudaTensor)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(8, 512, (n,), generator=g).tolist() for n in (3, 13, 30)]


def _run(cfg: EngineConfig) -> list[tuple[list[int], list[float]]]:
    engine = Engine(cfg)
    outs = []
    for params in (SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2),
                   SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=7, ignore_eos=True,
                                  repetition_penalty=1.1, min_tokens=3, logprobs=1)):
        for _ in range(2):  # the second round hits the prefix cache
            outs += [(c.token_ids, c.logprobs) for c in engine.generate(_prompts(), params)]
    return outs


def test_engine_on_a_gpu_makes_no_cpu_tensor_and_decodes_as_on_the_cpu(small_dir: Path) -> None:
    """Prefill, paged absorbed-MLA decode, the MoE, prefix-cache hits and the sampler's tensor work (greedy,
    seeded top-p/top-k, penalties, min_tokens, logprobs), all on 'cuda': same tokens as on the CPU."""
    cfg = dict(model=str(small_dir), dtype="float32", page_size=4, kv_cache_mb=8)
    want = _run(EngineConfig(**cfg))
    with fake_cuda():
        engine_cfg = EngineConfig(**cfg, device="cuda")
        got = _run(engine_cfg)
        engine = Engine(engine_cfg)
        assert next(engine.model.parameters()).device.type == "cuda"
        assert engine.cache.data.device.type == "cuda"
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_pd_decode_on_a_gpu_takes_kv_rows_from_the_wire(small_dir: Path) -> None:
    """Rows arrive from the network as CPU tensors; the decode engine's cache is on the GPU."""
    cfg = dict(model=str(small_dir), dtype="float32", page_size=4, kv_cache_mb=8)
    prompt = _prompts()[2]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = Engine(EngineConfig(**cfg)).generate([prompt], params)[0].token_ids

    class Wire:
        """The prefill side as the network delivers it: rows as CPU tensors, whatever device they came from."""

        def __init__(self, engine: Engine) -> None:
            self.engine = engine

        def __getattr__(self, name: str):
            return getattr(self.engine, name)

        def read_kv(self, rid: str, start: int, end: int) -> torch.Tensor:
            return self.engine.read_kv(rid, start, end).cpu()

    with fake_cuda():
        prefill, decode = Engine(EngineConfig(**cfg, device="cuda")), Engine(EngineConfig(**cfg, device="cuda"))
        assert pd_generate(Wire(prefill), decode, prompt, params) == want


@_simulated_only("reads the simulator's record of set_device calls, and uses cuda:1")
def test_every_thread_that_uses_the_gpu_binds_it(small_dir: Path) -> None:
    """CUDA's current device is per thread: the thread that builds the engine and the one that steps it both
    set it to the engine's GPU (else an EP rank on GPU 1 allocates and launches on GPU 0)."""
    from moemesh.engine.async_engine import AsyncEngine

    cfg = EngineConfig(model=str(small_dir), dtype="float32", page_size=4, kv_cache_mb=8, device="cuda:1")
    set_device_calls.clear()
    built: list[Engine] = []
    with fake_cuda():
        def load() -> None:
            with fake_cuda_in_this_thread():
                built.append(Engine(cfg))

        t = threading.Thread(target=load, name="loader")
        t.start()
        t.join()
        assert ("loader", 1) in set_device_calls

        async def start_and_stop() -> None:
            aengine = AsyncEngine(built[0])
            await aengine.start()
            await aengine.stop()
            assert aengine.error is None

        asyncio.run(start_and_stop())
    assert ("engine", 1) in set_device_calls


@_simulated_only("patches torch.cuda.is_available and reads the simulator's current device")
def test_an_ep_rank_binds_its_gpu_before_joining_and_hands_nccl_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from moemesh.ep.group import EPConfig, EPGroup

    seen: dict = {}

    class Joined(Exception):
        pass

    def init_process_group(backend: str, **kwargs: object) -> None:
        seen.update(kwargs, backend=backend, bound=current_device_of_this_thread())
        raise Joined

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    with fake_cuda(), pytest.raises(Joined):
        EPGroup(EPConfig(size=2, rank=1, init_addr="127.0.0.1:1", device="cuda:1"))
    assert seen["bound"] == 1 and seen["device_id"] == torch.device("cuda", 1)
    assert seen["backend"] == "cpu:gloo,cuda:nccl"


def test_ep_on_one_gpu_rank_decodes_as_on_the_cpu(small_dir: Path) -> None:
    """The MoE through EP dispatch, the grouped GEMM and combine, on 'cuda' (gloo carries the simulated GPU's
    data here, where NCCL would carry the real one's)."""
    from moemesh.ep.group import EPConfig, EPGroup

    cfg = dict(model=str(small_dir), dtype="float32", page_size=4, kv_cache_mb=8)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = [c.token_ids for c in Engine(EngineConfig(**cfg)).generate(_prompts(), params)]
    with fake_cuda():
        group = EPGroup(EPConfig(size=1, rank=0, init_addr=f"127.0.0.1:{free_port()}", redundant_experts=2,
                                 device="cuda:0"))
        try:
            engine = Engine(EngineConfig(**cfg, device="cuda"), ep=group, role_mode="low_latency")
            got = [c.token_ids for c in engine.generate(_prompts(), params)]
        finally:
            group.close()
    assert got == want


@pytest.mark.parametrize("argv", [["generate", "hi"], ["up"], ["bench", "engine"], ["serve", "decode"],
                                  ["serve", "prefill"]])
def test_every_engine_building_command_takes_a_device(argv: list[str], monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import importlib

    from moemesh.services.cli import main

    service = argv[1] if argv[0] == "serve" else None

    def build_parser():  # `serve NAME` hands its arguments to the service's own parser
        if service is None:
            return main.build_parser()
        return importlib.import_module(f"moemesh.services.{service}.serve").build_parser()

    argv = [] if service else argv
    monkeypatch.delenv("MOEMESH_DEVICE", raising=False)
    assert build_parser().parse_args(argv).device == "cpu"
    assert build_parser().parse_args([*argv, "--device", "cuda:3"]).device == "cuda:3"
    monkeypatch.setenv("MOEMESH_DEVICE", "cuda")
    assert build_parser().parse_args(argv).device == "cuda"
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*argv, "--device", "gpu0"])
    assert e.value.code == 2 and "device must be cpu, cuda or cuda:N, got 'gpu0'" in capsys.readouterr().err


def test_up_deals_the_gpus_out_one_per_worker() -> None:
    from moemesh.services.cli.up import worker_devices

    assert worker_devices("cuda", 3, num_gpus=8) == ["cuda:0", "cuda:1", "cuda:2"]
    assert worker_devices("cuda", 3, num_gpus=2) == ["cuda:0", "cuda:1", "cuda:0"]
    assert worker_devices("cuda:5", 2) == ["cuda:5", "cuda:5"] and worker_devices("cpu", 1) == ["cpu"]
    with pytest.raises(RuntimeError, match="sees no GPU"):
        worker_devices("cuda", 1, num_gpus=0)
