"""The client SDK against a real gateway on loopback (fake workers), sync and asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest

from moemesh.sdk import (
    AsyncMeshClient,
    DeadlineExceededError,
    InvalidArgumentError,
    MeshClient,
    MeshError,
    NotFoundError,
    RetryPolicy,
    UnavailableError,
)
from tests.net import free_port
from tests.service.gateway.doubles import FakeDecode, FakePrefill, Mesh, fake_token, make_tokenizer_dir

pytestmark = pytest.mark.timeout(30)
FAST_RETRY = RetryPolicy(retries=8, initial_backoff_s=0.05, max_backoff_s=0.3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer_dir(tmp_path_factory.mktemp("sdk") / "tok")


def test_async_client_generate_stream_chat_tokenize_list(model_dir: Path) -> None:
    async def main() -> None:
        async with Mesh(model_dir) as mesh:
            await mesh.add(FakeDecode(), "d1")
            await mesh.add(FakePrefill(), "p1")
            tokenizer = mesh.app.model.tokenizer
            prompt = tokenizer.encode("hello")
            async with AsyncMeshClient(mesh.app.address, timeout_s=10) as client:
                done = await client.generate("hello", max_tokens=3, temperature=0, logprobs=1, request_id="r1")
                expected = [fake_token(prompt, i) for i in range(3)]
                assert done.token_ids == expected and done.text == "".join(f"<{t}>" for t in expected)
                assert done.finish_reason == "length" and done.request_id == "r1"
                assert done.logprobs == [-0.5] * 3 and done.top_logprobs[0] == [(expected[0], -0.5)]
                assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(prompt), 3)

                chunks = [c async for c in client.stream(token_ids=[4, 5], max_tokens=2)]
                assert [c.token_ids for c in chunks] == [[6], [7]] and chunks[0].logprobs is None
                assert [c.finish_reason for c in chunks] == [None, "length"] and chunks[-1].usage is not None

                messages = [{"role": "user", "content": "hi"}]
                chat_ids = await client.tokenize(messages=messages)
                assert chat_ids == tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
                stop = fake_token(chat_ids, 0)
                done = await client.chat(messages, max_tokens=5, stop_token_ids=[stop])
                assert done.finish_reason == "stop" and done.stop_reason == stop and done.token_ids == [stop]
                chunks = [c async for c in client.chat_stream(messages, max_tokens=2)]
                assert len(chunks) == 2

                assert await client.tokenize("hello") == prompt
                assert await client.tokenize("hello", add_special_tokens=False) == prompt[1:]
                (info,) = await client.list_models()
                assert (info.id, info.num_prefill_workers, info.num_decode_workers) == ("tok", 1, 1)

    asyncio.run(main())


def test_errors_carry_code_and_message(model_dir: Path) -> None:
    async def main() -> None:
        async with Mesh(model_dir) as mesh:
            await mesh.add(FakeDecode(hang=True), "d1")
            async with AsyncMeshClient(mesh.app.address) as client:
                with pytest.raises(InvalidArgumentError) as excinfo:
                    await client.generate("hi", temperature=-1)
                assert excinfo.value.code == grpc.StatusCode.INVALID_ARGUMENT
                assert "temperature" in excinfo.value.message
                with pytest.raises(NotFoundError):
                    await client.generate("hi", model="other")
                with pytest.raises(DeadlineExceededError):
                    await client.generate("hi", timeout_s=0.3)
            with pytest.raises(InvalidArgumentError, match="max_tokens"):
                await client.generate("hi", max_tokens=0)
            with pytest.raises(InvalidArgumentError, match="exactly one"):
                await client.generate("hi", token_ids=[1])
            with pytest.raises(InvalidArgumentError, match="seed"):
                await client.generate("hi", seed=-1)
            with pytest.raises(TypeError):
                await client.generate("hi", temprature=0)

    asyncio.run(main())


def test_retries_unavailable_until_the_gateway_starts(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        port = free_port()
        client = AsyncMeshClient(f"127.0.0.1:{port}", timeout_s=15, retry_policy=FAST_RETRY)
        task = asyncio.ensure_future(client.generate("hi", max_tokens=2))
        await asyncio.sleep(0.2)  # the first attempts find nothing listening
        assert not task.done()
        async with Mesh(model_dir, port=port) as mesh:
            await asyncio.sleep(0.2)  # the gateway answers "no decode workers" for a while: retried too
            await mesh.add(FakeDecode(), "d1")
            done = await asyncio.wait_for(task, 10)
            assert done.finish_reason == "length" and len(done.token_ids) == 2
            await client.close()

    with caplog.at_level(logging.INFO, logger="moemesh.sdk"):
        asyncio.run(main())
    assert sum("retry" in r.message for r in caplog.records) >= 2


def test_gives_up_after_the_retries() -> None:
    client = MeshClient(f"127.0.0.1:{free_port()}", retry_policy=RetryPolicy(retries=2, initial_backoff_s=0.01))
    with client, pytest.raises(UnavailableError) as excinfo:
        client.list_models()
    assert excinfo.value.code == grpc.StatusCode.UNAVAILABLE


def test_never_retries_after_tokens_arrived(model_dir: Path) -> None:
    async def main() -> None:
        async with Mesh(model_dir) as mesh:
            decode = FakeDecode(fail_after=2)
            await mesh.add(decode, "d1")
            async with AsyncMeshClient(mesh.app.address, retry_policy=FAST_RETRY) as client:
                got = []
                with pytest.raises(UnavailableError, match="decode worker d1"):
                    async for chunk in client.stream("hi", max_tokens=10):
                        got.append(chunk)
                assert len(got) == 2 and len(decode.requests) == 1

    asyncio.run(main())


@contextlib.contextmanager
def background_mesh(model_dir: Path, **workers: Any) -> Iterator[tuple[Mesh, asyncio.AbstractEventLoop]]:
    """A Mesh served by an event loop on another thread, for the blocking client."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> Mesh:
        mesh = await Mesh(model_dir).__aenter__()
        for worker_id, servicer in workers.items():
            await mesh.add(servicer, worker_id)
        return mesh

    mesh = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield mesh, loop
    finally:
        asyncio.run_coroutine_threadsafe(mesh.__aexit__(None, None, None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_blocking_client_and_early_break_cancels(model_dir: Path) -> None:
    decode = FakeDecode(token_delay_s=0.02)
    with background_mesh(model_dir, d1=decode) as (mesh, loop), MeshClient(mesh.app.address, timeout_s=10) as client:
        done = client.generate("hello", max_tokens=3)
        assert len(done.token_ids) == 3 and done.finish_reason == "length"
        assert client.chat([{"role": "user", "content": "hi"}], max_tokens=2).usage.completion_tokens == 2
        assert client.tokenize("hello") == mesh.app.model.tokenizer.encode("hello")
        assert client.list_models()[0].num_decode_workers == 1
        for chunk in client.stream("hello", max_tokens=200):
            assert chunk.token_ids
            break  # leaving the loop cancels the call, the gateway cancels the worker's
        cancelled: Future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(decode.cancelled.wait(), 5), loop)
        cancelled.result(6)
        with pytest.raises(MeshError) as excinfo:
            client.generate("", max_tokens=2)
        assert excinfo.value.code == grpc.StatusCode.INVALID_ARGUMENT
