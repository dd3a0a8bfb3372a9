"""The OpenAI-compatible REST facade over real HTTP: the gateway's uvicorn, its core, fake workers."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import httpx
import pytest

from moemesh.services.gateway.rest import create_app
from moemesh.services.gateway.rest.metrics import registry_exposition
from tests.service.gateway.doubles import (
    MAX_MODEL_LEN,
    FakeDecode,
    FakePrefill,
    FakeWorker,
    fake_token,
    make_tokenizer_dir,
    start_test_gateway,
)
from tests.service.gateway.rest_doubles import error_of, rest_mesh, sse_events

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer_dir(tmp_path_factory.mktemp("rest") / "tok")


def _texts(prompt: list[int], n: int, start: int = 0) -> str:
    """What FakeDecode's text deltas add up to for its first n tokens."""
    return "".join(f"<{fake_token(prompt, i)}>" for i in range(start, n))


def test_completion_forwards_sampling_and_reports_usage(model_dir: Path) -> None:
    async def main() -> None:
        async with rest_mesh(model_dir) as (mesh, client):
            decode = FakeDecode()
            await mesh.add(decode, "d1")
            r = await client.post("/v1/completions", json={
                "model": "tok", "prompt": "hello world", "max_tokens": 4, "temperature": 0.5, "top_p": 0.9,
                "top_k": 7, "min_p": 0.1, "frequency_penalty": 0.5, "presence_penalty": -0.5,
                "repetition_penalty": 1.2, "seed": 11, "stop": "zz", "stop_token_ids": [1000], "ignore_eos": True,
                "min_tokens": 2, "include_stop_str_in_output": True, "an_unknown_field": {"is": "ignored"}})
            assert r.status_code == 200, r.text
            body = r.json()
            prompt = mesh.app.model.tokenizer.encode("hello world")
            assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
            assert isinstance(body["created"], int) and body["model"] == "tok"
            assert body["choices"] == [{"index": 0, "text": _texts(prompt, 4), "logprobs": None,
                                        "finish_reason": "length", "stop_reason": None}]
            assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 4,
                                     "total_tokens": len(prompt) + 4, "prompt_tokens_details": {"cached_tokens": 0}}
            s = decode.requests[0].sampling
            assert list(decode.requests[0].prompt_token_ids) == prompt
            assert (s.max_tokens, s.top_k, s.seed, list(s.stop), list(s.stop_token_ids)) == (4, 7, 11, ["zz"], [1000])
            assert s.temperature == pytest.approx(0.5) and s.top_p == pytest.approx(0.9)
            assert s.min_p == pytest.approx(0.1) and s.repetition_penalty == pytest.approx(1.2)
            assert (s.frequency_penalty, s.presence_penalty) == (0.5, -0.5)
            assert s.ignore_eos and s.min_tokens == 2 and s.include_stop_str_in_output
            assert not s.HasField("logprobs")
            # Unset options stay unset on the wire (the engine's defaults apply); completions default to 16.
            r = await client.post("/v1/completions", json={"prompt": "x"})
            s = decode.requests[1].sampling
            assert r.json()["usage"]["completion_tokens"] == 16 and s.max_tokens == 16
            assert not s.HasField("temperature") and not s.HasField("seed") and not s.HasField("top_p")

    asyncio.run(main())


def test_n_fans_out_with_seed_plus_i_and_batches_prompts(model_dir: Path) -> None:
    async def main() -> None:
        async with rest_mesh(model_dir) as (mesh, client):
            decode = FakeDecode()
            await mesh.add(decode, "d1")
            r = await client.post("/v1/completions", json={"prompt": "hi", "n": 3, "seed": 40, "max_tokens": 2})
            body = r.json()
            assert [c["index"] for c in body["choices"]] == [0, 1, 2]
            assert sorted(q.sampling.seed for q in decode.requests) == [40, 41, 42]
            prompt = mesh.app.model.tokenizer.encode("hi")
            assert body["usage"]["prompt_tokens"] == len(prompt)  # once, not once per choice
            assert body["usage"]["completion_tokens"] == 6
            # A batch: choices are prompt-major; token-id prompts go to the workers as they are.
            decode.requests.clear()
            r = await client.post("/v1/completions", json={"prompt": [[5, 6, 7], [9]], "n": 2, "max_tokens": 1,
                                                           "seed": -1})
            body = r.json()
            assert [c["text"] for c in body["choices"]] == ["<8>", "<8>", "<10>", "<10>"]
            assert body["usage"]["prompt_tokens"] == 4 and body["usage"]["completion_tokens"] == 4
            assert sorted(q.sampling.seed for q in decode.requests) == [0, 0, 2**64 - 1, 2**64 - 1]
            r = await client.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 1, "echo": True})
            assert [c["text"][:1] for c in r.json()["choices"]] == ["a", "b"]

    asyncio.run(main())


def test_choices_spread_over_decode_workers(model_dir: Path) -> None:
    async def main() -> None:
        async with rest_mesh(model_dir) as (mesh, client):
            first, second = FakeDecode(), FakeDecode()
            await mesh.add(first, "d1")
            await mesh.add(second, "d2")
            r = await client.post("/v1/completions", json={"prompt": "hi " * 40, "n": 2, "max_tokens": 1})
            assert r.status_code == 200
            # Each choice took its worker before the next was routed: the router saw the load.
            assert (len(first.requests), len(second.requests)) == (1, 1)

    asyncio.run(main())


def test_busy_http_port_fails_start_naming_it(model_dir: Path) -> None:
    async def main() -> None:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            with pytest.raises(OSError, match=f"cannot listen for HTTP on 127.0.0.1:{port}"):
                await start_test_gateway(model_dir, http_port=port)

    asyncio.run(main())


def test_completion_logprobs_shape(model_dir: Path) -> None:
    async def main() -> None:
        async with rest_mesh(model_dir) as (mesh, client):
            await mesh.add(FakeDecode(), "d1")
            r = await client.post("/v1/completions", json={"prompt": [100], "max_tokens": 3, "logprobs": 1})
            lp = r.json()["choices"][0]["logprobs"]
            tok = mesh.app.model.tokenizer
            names = [tok.decode([t], skip_special_tokens=False) for t in (101, 102, 103)]
            assert lp["tokens"] == names and lp["token_logprobs"] == [-0.5] * 3
            assert lp["top_logprobs"] == [{n: -0.5} for n in names]
            assert lp["text_offset"] == [0, len(names[0]), len(names[0]) + len(names[1])]
            # Streamed, the offsets run on across chunks.
            r = await client.post("/v1/completions", json={"prompt": [100], "max_tokens": 3, "logprobs": 0,
                                                           "stream": True})
            chunks = [e for e in sse_events(r.text) if e != "[DONE]"]
            assert [c["choices"][0]["logprobs"]["text_offset"][0] for c in chunks] == lp["text_offset"]

    asyncio.run(main())


def test_chat_completion_template_usage_and_logprobs(model_dir: Path) -> None:
    async def main() -> None:
        async with rest_mesh(model_dir) as (mesh, client):
            decode = FakeDecode()
            await mesh.add(decode, "d1")
            messages = [{"role": "system", "content": "be brief"},
                        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "you"}]}]
            r = await client.post("/v1/chat/completions", json={
                "messages": messages, "max_tokens": 9, "max_completion_tokens": 2, "logprobs": True, "top_logprobs": 1})
            body = r.json()
            tok = mesh.app.model.tokenizer
            prompt = tok.encode(tok.apply_chat_template([messages[0], {"role": "user", "content": "hi\nyou"}]),
                                add_special_tokens=False)
            assert list(decode.requests[0].prompt_token_ids) == prompt
            assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
            choice = body["choices"][0]
            assert choice["message"] == {"role": "assistant", "content": _texts(prompt, 2), "reasoning_content": None,
                                         "tool_calls": []}
            assert choice["finish_reason"] == "length" and decode.requests[0].sampling.logprobs == 1
            first = choice["logprobs"]["content"][0]
            name = tok.decode([fake_token(prompt, 0)], skip_special_tokens=False)
            assert first == {"token": name, "logprob": -0.5, "bytes": list(name.encode()),
                             "top_logprobs": [{"token": name, "logprob": -0.5, "bytes": list(name.encode())}]}
            assert body["usage"]["prompt_tokens"] == len(prompt) and body["usage"]["completion_tokens"] == 2
            r = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2, "n": 3})
            usage = r.json()["usage"]  # the prompt counts once, whatever n
            assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(prompt), 6)
            # Without a limit, a chat answer may use what the context leaves after its prompt (as vLLM).
            r = await client.post("/v1/chat/completions", json={"messages": messages[1:], "stop_token_ids": [
                fake_token(prompt, 0)]})
            sent = decode.requests[-1]
            assert sent.sampling.max_tokens == MAX_MODEL_LEN - len(sent.prompt_token_ids)

    asyncio.run(main())


def test_streams_end_with_done_and_usage_chunk(model_dir: Path) -> None:
    async def main() -> None:
        async with rest_mesh(model_dir) as (mesh, client):
            await mesh.add(FakeDecode(), "d1")
            prompt = mesh.app.model.tokenizer.encode("hi")
            r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True,
                                                           "stream_options": {"include_usage": True}})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r.text)
            assert events[-1] == "[DONE]"
            usage, chunks = events[-2], events[:-2]
            assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
            assert all(c["usage"] is None and c["object"] == "text_completion" for c in chunks)
            assert len({c["id"] for c in events[:-1]}) == 1
            assert "".join(c["choices"][0]["text"] for c in chunks) == _texts(prompt, 3)
            assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
            # Chat: the role first, then content; no usage key at all without include_usage.
            r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                                "max_tokens": 2, "n": 2, "stream": True})
            events = sse_events(r.text)
            assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])
            assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
            assert [e["choices"][0]["delta"] for e in events[:2]] == [{"role": "assistant", "content": ""}] * 2
            for i in (0, 1):
                mine = [e["choices"][0] for e in events[2:-1] if e["choices"][0]["index"] == i]
                assert [c["finish_reason"] for c in mine] == [None, "length"]
                assert all(set(c["delta"]) == {"content"} for c in mine)

    asyncio.run(main())


def test_stop_token_id_ends_with_stop_and_its_reason(model_dir: Path) -> None:
    async def main() -> None:
        async with rest_mesh(model_dir) as (mesh, client):
            await mesh.add(FakeDecode(), "d1")
            r = await client.post("/v1/completions", json={"prompt": [10], "max_tokens": 8, "stop_token_ids": [12]})
            choice = r.json()["choices"][0]
            assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == ("<11><12>", "stop", 12)

    asyncio.run(main())


def test_models_health_metrics_and_openapi(model_dir: Path) -> None:
    async def main() -> None:
        async with rest_mesh(model_dir) as (mesh, client):
            r = await client.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "unavailable"
            await mesh.add(FakePrefill(), "p1")
            assert (await client.get("/health")).status_code == 503  # prefill alone cannot serve
            await mesh.add(FakeDecode(), "d1")
            r = await client.get("/health")
            assert r.status_code == 200 and r.json() == {"status": "ok", "decode_workers": 1, "prefill_workers": 1}
            models = (await client.get("/v1/models")).json()
            assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tok"]
            assert models["data"][0]["object"] == "model" and models["data"][0]["max_model_len"] == MAX_MODEL_LEN
            assert (await client.get("/v1/models/tok")).json()["id"] == "tok"
            error_of(await client.get("/v1/models/other"), 404)
            r = await client.get("/metrics")
            # The gateway's REST port serves the process's Prometheus families (moemesh.telemetry).
            assert r.status_code == 200 and "# TYPE moemesh_time_to_first_token_seconds histogram" in r.text
            assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
            doc = (await client.get("/openapi.json")).json()
            for path in ("/v1/completions", "/v1/chat/completions"):
                op = doc["paths"][path]["post"]
                assert "422" not in op["responses"]
                assert {"400", "404", "429", "503", "504"} <= set(op["responses"])
                assert set(op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
            schemas = doc["components"]["schemas"]
            max_tokens = schemas["CompletionRequest"]["properties"]["max_tokens"]["anyOf"][0]
            assert max_tokens["minimum"] == 0 and schemas["CompletionRequest"]["properties"]["max_tokens"][
                "description"]
            assert {"CompletionChunk", "ChatCompletionChunk", "ErrorResponse"} <= set(schemas)

    asyncio.run(main())


def test_a_prometheus_registry_plugs_into_metrics(model_dir: Path) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.Counter("moemesh_test_total", "A test counter.", registry=registry).inc(3)

    async def main() -> None:
        async with rest_mesh(model_dir) as (mesh, _):
            app = create_app(mesh.app.core, metrics=registry_exposition(registry))
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
                r = await client.get("/metrics")
                assert r.status_code == 200 and "moemesh_test_total 3.0" in r.text
                assert r.headers["content-type"].startswith("text/plain; version=0.0.4")

    asyncio.run(main())


def test_client_disconnect_mid_stream_cancels_downstream(model_dir: Path) -> None:
    async def main() -> None:
        async with rest_mesh(model_dir) as (mesh, client):
            decode = FakeDecode(token_delay_s=0.05)
            await mesh.add(decode, "d1")
            async with client.stream("POST", "/v1/completions",
                                     json={"prompt": "hi", "max_tokens": 200, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break  # leave after the first chunk: the connection closes
            await asyncio.wait_for(decode.cancelled.wait(), 5)
            await asyncio.wait_for(decode.aborted.wait(), 5)
            for _ in range(100):  # the abort's own RPC holds the worker a moment longer
                if all(w.in_flight == 0 for w in mesh.app.registry.workers()):
                    break
                await asyncio.sleep(0.02)
            assert all(w.in_flight == 0 for w in mesh.app.registry.workers())
            # Not streaming: a client that gives up (here, its read timeout) cancels the request too.
            decode.cancelled.clear()
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/v1/chat/completions", timeout=0.5, json={
                    "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200})
            await asyncio.wait_for(decode.cancelled.wait(), 5)

    asyncio.run(main())


def test_stopping_the_gateway_ends_open_streams_with_an_error_event(model_dir: Path) -> None:
    async def main() -> None:
        app = await start_test_gateway(model_dir, http_port=0)
        decode = FakeDecode(token_delay_s=0.05)
        worker = await FakeWorker(app.address, decode, "d1").start()
        try:
            async with httpx.AsyncClient(base_url=f"http://{app.http_address}", trust_env=False) as client:
                async with client.stream("POST", "/v1/completions",
                                         json={"prompt": "hi", "max_tokens": 200, "stream": True}) as r:
                    lines = r.aiter_lines()
                    assert (await anext(lines)).startswith("data: {")
                    stopping = asyncio.ensure_future(app.stop(0.2))
                    body = "".join([line + "\n" async for line in lines])
                await asyncio.wait_for(stopping, 5)
            assert '"error"' in body and "shutting down" in body and body.rstrip().endswith("data: [DONE]")
            assert decode.aborted.is_set()  # the request was ended on the worker before the gateway closed
        finally:
            await worker.stop(deregister=False)

    asyncio.run(main())


