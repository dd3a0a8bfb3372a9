"""Prompts that take many prefill chunks and KV pages through the real mesh (`moemesh up`): in PD mode the
prefill worker streams each chunk's KV rows as it computes them, so a wrong row in any later chunk shows up as
different greedy tokens from the in-process engine's."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from moemesh.engine.engine import Engine, EngineConfig
from moemesh.engine.sampling_params import SamplingParams
from moemesh.model.default import default_model_dir
from moemesh.model.tokenizer import Tokenizer
from moemesh.sdk import MeshClient
from tests.processes.mesh.launch import start_mesh

PAGE_SIZE = 4
CHUNK = 8  # --max-num-batched-tokens: prompt tokens per prefill step, all requests together
MAX_TOKENS = 8
PROMPTS = [
    "The quick brown fox jumps over the lazy dog while the mesh computes its prompt in many small chunks",
    " ".join(str(i) for i in range(40)),
    "Once upon a time there was a mesh of services that streamed KV pages from prefill to decode.",
    "Hello there, mesh of many services",
]
WORKER_OPTIONS = ("--", "--page-size", str(PAGE_SIZE), "--max-num-batched-tokens", str(CHUNK))


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    """Greedy tokens from the in-process engine at its defaults (each prompt one chunk, 16-token pages): a
    chunking mistake in the engine itself would not hide behind the same mistake in the reference."""
    engine = Engine(EngineConfig(model=str(default_model_dir()), kv_cache_mb=64))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return [c.token_ids for c in engine.generate(PROMPTS, params)]


def test_prompts_span_many_chunks_and_pages() -> None:
    lengths = [len(Tokenizer.from_dir(default_model_dir()).encode(p)) for p in PROMPTS]
    assert sum(n >= 4 * CHUNK and n >= 8 * PAGE_SIZE for n in lengths) >= 3, lengths
    assert min(lengths) > CHUNK, lengths  # even the shortest takes two chunks


def _generate(gateway: str, prompts: list[str]) -> list[list[int]]:
    # All at once: the chunks of different prompts share prefill steps.
    with MeshClient(gateway, timeout_s=180) as client, cf.ThreadPoolExecutor(len(prompts)) as pool:
        futs = [pool.submit(client.generate, prompt=p, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
                for p in prompts]
        return [f.result().token_ids for f in futs]


@pytest.mark.parametrize("args", [
    ("--prefill", "1", "--decode", "1", "--transfer", "relay"),
    ("--prefill", "0", "--decode", "1"),
], ids=["pd", "colocated"])
def test_multi_chunk_prompts_equal_in_process(args: tuple[str, ...], reference: list[list[int]]) -> None:
    mesh = start_mesh(*args, *WORKER_OPTIONS)
    try:
        assert _generate(mesh.gateway, PROMPTS) == reference
        # Again: now the prompts' full pages come from the prefix cache and only their tails are computed.
        assert _generate(mesh.gateway, PROMPTS) == reference
    finally:
        mesh.stop()
    assert mesh.proc.returncode == 0
