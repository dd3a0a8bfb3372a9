"""Prompt logprobs when the decode worker computes the prompt itself (`moemesh up --prefill 0`): they come with the
first DecodeResponse, and equal those of the PD mesh's prefill worker (the same model, same numbers)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from moemesh.engine.engine import Engine, EngineConfig
from moemesh.model.mla import NoCacheAttention
from moemesh.sdk import MeshClient
from tests.processes.mesh.launch import RunningMesh, running_mesh


@pytest.fixture(scope="module")
def mesh() -> Iterator[RunningMesh]:
    with running_mesh("--prefill", "0", "--decode", "1") as running:
        yield running


def test_colocated_prompt_logprobs(mesh: RunningMesh) -> None:
    prompt = "Prompt logprobs, colocated"
    with MeshClient(mesh.gateway, timeout_s=120) as sdk:
        ids = sdk.tokenize(prompt)
        done = sdk.generate(prompt, max_tokens=3, temperature=0, prompt_logprobs=1)
        streamed = list(sdk.stream(prompt, max_tokens=3, temperature=0, prompt_logprobs=1))
    engine = Engine(EngineConfig(kv_cache_mb=16))
    with torch.inference_mode():
        hidden = engine.model(torch.tensor(ids), torch.arange(len(ids)), NoCacheAttention([len(ids)]))
        ref = torch.log_softmax(engine.model.compute_logits(hidden[:-1]), dim=-1)
    assert [lp for lp, _ in done.prompt_logprobs] == pytest.approx(
        [float(ref[p - 1, ids[p]]) for p in range(1, len(ids))], abs=1e-4)
    assert [top[0][0] for _, top in done.prompt_logprobs] == ref.argmax(-1).tolist()
    assert streamed[0].prompt_logprobs == done.prompt_logprobs
    assert all(c.prompt_logprobs is None for c in streamed[1:])
