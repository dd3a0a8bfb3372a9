"""Every error status of the REST facade, in OpenAI's error shape, over raw HTTP; never a 500 for bad input."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.service.gateway.doubles import MAX_MODEL_LEN, VOCAB, FakeDecode, FakePrefill, make_tokenizer_dir
from tests.service.gateway.rest_doubles import error_of, rest_mesh, sse_events

pytestmark = pytest.mark.timeout(30)
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer_dir(tmp_path_factory.mktemp("rest-errors") / "tok")


BAD_COMPLETIONS: list[tuple[dict[str, Any], str]] = [
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "5"}, "max_tokens"),  # strict: a string is not a number
    ({"prompt": "hi", "max_tokens": True}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 2**40}, "max_tokens"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "temperature": -0.1}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "top_k": -2}, "top_k"),
    ({"prompt": "hi", "min_p": 1.5}, "min_p"),
    ({"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "seed": 2**70}, "seed"),
    ({"prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids"),
    ({"prompt": "hi", "stop": [""]}, "stop"),  # the engine's own check, through the core
    ({"prompt": "hi", "min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "hi", "suffix": "x"}, "suffix"),
    ({"prompt": "hi", "best_of": 3}, "best_of"),
    ({"prompt": "hi", "echo": True, "logprobs": 1, "max_tokens": -1}, "max_tokens"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [VOCAB + 5]}, "vocabulary"),
    ({"prompt": [1] * MAX_MODEL_LEN}, "context limit"),  # a prompt that does not fit the context
    ({"prompt": "word " * MAX_MODEL_LEN}, "context limit"),
    ({}, "prompt"),
]

BAD_CHATS: list[tuple[dict[str, Any], str]] = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "image_url"),
    ({"messages": [{"role": "user", "content": None}]}, "content"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "roles"),  # the tiny chat template refuses the role
    ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 30}, "top_logprobs"),
    ({"messages": CHAT, "max_completion_tokens": -3}, "max_completion_tokens"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": CHAT, "response_format": {"type": "yaml"}}, "response_format"),
    ({"messages": CHAT, "structured_outputs": {"regex": 5}}, "structured_outputs"),
    ({"messages": [{"role": "user", "content": "word " * MAX_MODEL_LEN}]}, "context limit"),
]


def names(err: dict[str, Any], needle: str) -> bool:
    """Whether an OpenAI-shaped error names `needle`: as its `param` (a field path such as "messages.0.role":
    any of its parts), else as whole words of its message ("n" is not named by "min_tokens" or "an")."""
    if err.get("param") and needle in err["param"].split("."):
        return True
    return re.search(rf"(?<![\w.]){re.escape(needle)}(?!\w)", err["message"]) is not None


def test_the_field_check_needs_the_whole_name() -> None:
    assert names({"param": "n", "message": "x"}, "n")
    assert names({"param": "messages.0.role", "message": "x"}, "role")
    assert names({"param": None, "message": "min_tokens (5) must not exceed max_tokens (2)"}, "min_tokens")
    assert not names({"param": "min_tokens", "message": "an input must not be negative"}, "n")
    assert not names({"param": None, "message": "max_tokens: too large"}, "tokens")


def test_bad_parameters_are_400_naming_the_field(model_dir: Path) -> None:
    async def main() -> None:
        async with rest_mesh(model_dir) as (mesh, client):
            await mesh.add(FakeDecode(), "d1")
            for path, cases in (("/v1/completions", BAD_COMPLETIONS), ("/v1/chat/completions", BAD_CHATS)):
                for body, needle in cases:
                    for stream in (False, True) if "stream_options" not in body else (False,):
                        r = await client.post(path, json={**body, "stream": stream} if body else body)
                        err = error_of(r, 400)
                        assert err["type"] == "invalid_request_error"
                        assert names(err, needle), (body, err)

    asyncio.run(main())


def test_malformed_bodies_are_400_and_unknown_routes_404(model_dir: Path) -> None:
    async def main() -> None:
        async with rest_mesh(model_dir) as (mesh, client):
            await mesh.add(FakeDecode(), "d1")
            for content in (b"{bad json", b"", b"[1, 2]", b"null", b"\xff\xfe"):
                r = await client.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
                error_of(r, 400)
            error_of(await client.post("/v1/chat/completions", content=b"messages=hi",
                                       headers={"Content-Type": "application/x-www-form-urlencoded"}), 400)
            error_of(await client.post("/v1/nothing", json={}), 404)
            error_of(await client.get("/v1/completions"), 405)
            # Unknown fields are ignored, as OpenAI clients send many.
            r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "logit_bias": {},
                                                           "user": "u", "frobnicate": [1]})
            assert r.status_code == 200, r.text

    asyncio.run(main())


def test_api_key_is_required_on_v1_only(model_dir: Path) -> None:
    async def main() -> None:
        async with rest_mesh(model_dir, api_key="sesame") as (mesh, client):
            await mesh.add(FakeDecode(), "d1")
            body = {"prompt": "hi", "max_tokens": 1}
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic sesame"},
                            {"Authorization": "sesame"}):
                r = await client.post("/v1/completions", json=body, headers=headers)
                err = error_of(r, 401)
                assert err["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
            # The key is checked before the body is read: no hint about the body without it.
            error_of(await client.post("/v1/completions", content=b"{bad"), 401)
            error_of(await client.get("/v1/models"), 401)
            ok = {"Authorization": "Bearer sesame"}
            assert (await client.post("/v1/completions", json=body, headers=ok)).status_code == 200
            assert (await client.post("/v1/completions", json=body,
                                      headers={"Authorization": "bearer sesame"})).status_code == 200
            assert (await client.get("/health")).status_code == 200
            assert (await client.get("/metrics")).status_code == 200
            doc = (await client.get("/openapi.json")).json()
            assert "401" in doc["paths"]["/v1/completions"]["post"]["responses"]

    asyncio.run(main())


def test_unknown_model_is_404(model_dir: Path) -> None:
    async def main() -> None:
        async with rest_mesh(model_dir) as (mesh, client):
            await mesh.add(FakeDecode(), "d1")
            for path, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": CHAT})):
                for stream in (False, True):
                    err = error_of(await client.post(path, json={**body, "model": "gpt-4", "stream": stream}), 404)
                    assert err["code"] == "model_not_found" and "gpt-4" in err["message"]

    asyncio.run(main())


def test_no_workers_is_503(model_dir: Path) -> None:
    async def main() -> None:
        async with rest_mesh(model_dir) as (_, client):
            for path, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": CHAT})):
                for stream in (False, True):
                    err = error_of(await client.post(path, json={**body, "stream": stream}), 503)
                    assert err["type"] == "service_unavailable_error" and "no decode workers" in err["message"]

    asyncio.run(main())


def test_full_queues_are_429(model_dir: Path) -> None:
    async def main() -> None:
        async with rest_mesh(model_dir) as (mesh, client):
            await mesh.add(FakeDecode(token_delay_s=0.05), "d1")
            await mesh.add(FakePrefill(fail_code=grpc.StatusCode.RESOURCE_EXHAUSTED), "p1")
            for stream in (False, True):  # a stream failing before its first token still gets the status
                r = await client.post("/v1/completions", json={"prompt": "hi", "stream": stream})
                assert error_of(r, 429)["type"] == "rate_limit_error"

    asyncio.run(main())


def test_deadline_is_504(model_dir: Path) -> None:
    async def main() -> None:
        timeout_s = 0.3  # waited out in full, twice: the decode worker hangs
        async with rest_mesh(model_dir, default_request_timeout_s=timeout_s) as (mesh, client):
            decode = FakeDecode(hang=True)
            await mesh.add(decode, "d1")
            for stream in (False, True):
                r = await client.post("/v1/chat/completions", json={"messages": CHAT, "stream": stream})
                assert error_of(r, 504)["type"] == "timeout_error"
            assert decode.deadlines[0] == pytest.approx(timeout_s, abs=0.2)

    asyncio.run(main())


def test_failure_after_the_first_token_is_an_error_event(model_dir: Path) -> None:
    async def main() -> None:
        async with rest_mesh(model_dir) as (mesh, client):
            await mesh.add(FakeDecode(fail_after=2), "d1")
            r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5, "stream": True})
            assert r.status_code == 200
            events = sse_events(r.text)
            assert [len(e["choices"]) for e in events[:2]] == [1, 1]
            assert events[2]["error"]["type"] == "service_unavailable_error" and events[3] == "[DONE]"
            # Not streamed, the same failure is the call's status.
            error_of(await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5}), 503)

    asyncio.run(main())
