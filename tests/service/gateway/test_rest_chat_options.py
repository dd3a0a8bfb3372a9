"""The REST facade's smaller chat options and limits: unknown fields logged once, the context limit as vLLM words
it, options that are not supported refused instead of dropped."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from tests.service.gateway.doubles import MAX_MODEL_LEN, FakeDecode, make_tokenizer_dir
from tests.service.gateway.rest_doubles import error_of, rest_mesh

pytestmark = pytest.mark.timeout(30)
ASK = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer_dir(tmp_path_factory.mktemp("options") / "tok")


def test_unknown_fields_are_accepted_and_logged_once_per_name(model_dir: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with rest_mesh(model_dir) as (mesh, client):
            await mesh.add(FakeDecode(), "d1")
            for _ in range(2):
                r = await client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 2,
                                                                    "frobnicate": 1, "prediction": {"type": "content"}})
                assert r.status_code == 200, r.text
            r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "frobnicate": 1})
            assert r.status_code == 200, r.text

    with caplog.at_level(logging.WARNING, logger="moemesh.services.gateway.rest.unknown_fields"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert lines == [
        "/v1/chat/completions: ignoring request fields this gateway does not know: frobnicate, prediction "
        "(logged once per field)",
        "/v1/completions: ignoring request fields this gateway does not know: frobnicate (logged once per field)"]


def test_prompt_plus_max_tokens_beyond_the_context_is_a_400(model_dir: Path) -> None:
    async def main() -> None:
        async with rest_mesh(model_dir) as (mesh, client):
            decode = FakeDecode()
            await mesh.add(decode, "d1")
            prompt = mesh.app.model.tokenizer.encode("hi")
            err = error_of(await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": MAX_MODEL_LEN}),
                           400)
            assert err["message"] == (
                f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested "
                f"{len(prompt) + MAX_MODEL_LEN} tokens ({len(prompt)} in the prompt, {MAX_MODEL_LEN} in the "
                "completion). Please reduce the length of the prompt or completion.")
            err = error_of(await client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 10**6}), 400)
            assert "in the messages" in err["message"]
            r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": MAX_MODEL_LEN - len(prompt)})
            assert r.status_code == 200 and not decode.requests[1:]  # only the last one reached the worker

    asyncio.run(main())


def test_bad_logit_bias_is_refused(model_dir: Path) -> None:
    async def main() -> None:
        async with rest_mesh(model_dir) as (mesh, client):
            await mesh.add(FakeDecode(), "d1")
            for url, body, param in [
                ("/v1/chat/completions", {"messages": ASK, "logit_bias": {"five": 1.0}}, "logit_bias"),
                ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
            ]:
                err = error_of(await client.post(url, json=body), 400)
                assert err["param"] == param or err["message"].startswith(param), err  # the edge's or the core's
            r = await client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 2,
                                                                "skip_special_tokens": True, "logit_bias": {}})
            assert r.status_code == 200, r.text

    asyncio.run(main())
