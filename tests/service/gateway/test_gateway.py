"""The gateway end to end on loopback: real grpc.aio servers, fake prefill and decode workers."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc
import pytest

from moemesh.services.gateway.serve import add_arguments, config_from_args
from moemesh.v1 import common_pb2, gateway_pb2, prefill_pb2
from tests.service.gateway.doubles import (
    MAX_MODEL_LEN,
    VOCAB,
    FakeDecode,
    FakePrefill,
    Mesh,
    fake_token,
    make_tokenizer_dir,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer_dir(tmp_path_factory.mktemp("gateway") / "tok")


async def _wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def _rpc_error(excinfo: pytest.ExceptionInfo) -> tuple[grpc.StatusCode, str]:
    return excinfo.value.code(), excinfo.value.details()


def test_pd_request_goes_to_both_workers_with_one_room(model_dir: Path) -> None:
    async def main() -> None:
        async with Mesh(model_dir) as mesh:
            decode, prefill = FakeDecode(), FakePrefill()
            await mesh.add(decode, "d1")
            await mesh.add(prefill, "p1")
            out = await mesh.generate(prompt="hello world", request_id="req-1",
                                      sampling=common_pb2.SamplingParams(max_tokens=4, logprobs=1))
            prompt = mesh.app.model.tokenizer.encode("hello world")
            assert prompt[0] == mesh.app.model.tokenizer.bos_token_id
            assert [t for r in out for t in r.token_ids] == [fake_token(prompt, i) for i in range(4)]
            assert all(r.request_id == "req-1" for r in out) and len(out[0].logprobs) == 1
            assert [r.finish_reason for r in out] == [0, 0, 0, common_pb2.FINISH_REASON_LENGTH]
            usage = out[-1].usage
            assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_prompt_tokens) == (len(prompt), 4, 3)
            (dreq,), (preq,) = decode.requests, prefill.requests
            assert dreq.room_id and dreq.room_id == preq.room_id
            assert list(dreq.prompt_token_ids) == list(preq.prompt_token_ids) == prompt
            # The workers' key: the client's id made unique per attempt.
            assert dreq.request_id == preq.request_id and dreq.request_id.startswith("req-1@")
            # A finished request ends cleanly on the workers: no cancel, no abort; in-flight counts drop.
            assert all(w.in_flight == 0 for w in mesh.app.registry.workers())
            assert not decode.cancelled.is_set() and decode.aborts == prefill.aborts == []

    asyncio.run(main())


@pytest.mark.parametrize("logprobs", [False, True])
def test_prefill_first_token_reaches_the_client_before_decode_repeats_it(model_dir: Path, logprobs: bool) -> None:
    """PrefillStream's early first token goes out at once; decode's first output, which repeats it, goes out
    without it: every token (and its text and logprobs) exactly once, in order, with the usage counting each once."""
    async def main() -> None:
        async with Mesh(model_dir) as mesh:
            await mesh.add(FakeDecode(token_delay_s=0.4), "d1")
            await mesh.add(FakePrefill(early=True), "p1")
            sampling = common_pb2.SamplingParams(max_tokens=3, **({"logprobs": 1} if logprobs else {}))
            call = mesh.stub.Generate(gateway_pb2.GenerateRequest(prompt="hello world", sampling=sampling))
            loop = asyncio.get_running_loop()
            start = loop.time()
            out, times = [], []
            async for r in call:
                out.append(r)
                times.append(loop.time() - start)
            prompt = mesh.app.model.tokenizer.encode("hello world")
            tokens = [fake_token(prompt, i) for i in range(3)]
            assert times[0] < 0.3, f"the first token waited for decode ({times[0]:.2f} s)"
            assert [t for r in out for t in r.token_ids] == tokens
            assert "".join(r.text for r in out) == "".join(f"<{t}>" for t in tokens)
            assert sum(len(r.logprobs) for r in out) == (3 if logprobs else 0)
            assert all(len(r.token_ids) == 1 for r in out)  # decode's repeat of the first token was dropped
            assert out[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert out[-1].usage.completion_tokens == 3

    asyncio.run(main())


def test_an_early_first_token_waits_when_prompt_logprobs_must_lead(model_dir: Path) -> None:
    """Prompt logprobs go out with the first response and come in prefill's reply: a first-token event is not
    relayed on its own then, and decode's first output is relayed whole."""
    async def main() -> None:
        async with Mesh(model_dir) as mesh:
            await mesh.add(FakeDecode(token_delay_s=0.1), "d1")
            await mesh.add(FakePrefill(early=True), "p1")
            out = await mesh.generate(prompt="hello world",
                                      sampling=common_pb2.SamplingParams(max_tokens=3, prompt_logprobs=0))
            prompt = mesh.app.model.tokenizer.encode("hello world")
            assert [t for r in out for t in r.token_ids] == [fake_token(prompt, i) for i in range(3)]
            assert out[-1].usage.completion_tokens == 3

    asyncio.run(main())


def test_a_decode_output_that_contradicts_the_early_first_token_fails_the_request(model_dir: Path) -> None:
    """Decode commits the prefill worker's token, so a different one is a bug: an error, never a garbled stream."""
    class Contrary(FakePrefill):
        async def PrefillStream(self, request, context):  # type: ignore[no-untyped-def]
            yield prefill_pb2.PrefillEvent(first=prefill_pb2.FirstTokenEvent(token_id=7, text="<7>"))
            yield prefill_pb2.PrefillEvent(done=await self.Prefill(request, context))

    async def main() -> None:
        async with Mesh(model_dir, max_migrations=0) as mesh:
            await mesh.add(FakeDecode(token_delay_s=0.2), "d1")
            await mesh.add(Contrary(), "p1")
            with pytest.raises(grpc.aio.AioRpcError) as excinfo:
                await mesh.generate(prompt="hello world", sampling=common_pb2.SamplingParams(max_tokens=2))
            code, details = _rpc_error(excinfo)
            assert code == grpc.StatusCode.INTERNAL and "not the prefill worker's 7" in details

    asyncio.run(main())


def test_usage_counts_the_cached_prefix_when_decode_finishes_before_prefill_replies(model_dir: Path) -> None:
    """Prefill's reply follows the KV it sent, so a short request can finish on decode first: the usage still
    reports prefill's cached prefix (seen on a loaded CI machine as 0 where 3 was due)."""
    async def main() -> None:
        async with Mesh(model_dir) as mesh:
            await mesh.add(FakeDecode(), "d1")
            await mesh.add(FakePrefill(delay_s=0.3), "p1")
            out = await mesh.generate(prompt="hello world", request_id="req-1",
                                      sampling=common_pb2.SamplingParams(max_tokens=2))
            assert out[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert out[-1].usage.cached_prompt_tokens == 3

    asyncio.run(main())


def test_colocated_without_prefill_workers_and_chat_and_stop_reason(model_dir: Path) -> None:
    async def main() -> None:
        async with Mesh(model_dir) as mesh:
            decode = FakeDecode()
            await mesh.add(decode, "d1")
            chat = gateway_pb2.ChatMessages(messages=[gateway_pb2.ChatMessage(role="user", content="hi")],
                                            add_generation_prompt=True)
            expected = mesh.app.model.tokenizer.encode(
                mesh.app.model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]),
                add_special_tokens=False)
            stop = fake_token(expected, 1)
            out = await mesh.generate(messages=chat, sampling=common_pb2.SamplingParams(
                max_tokens=8, stop_token_ids=[stop]))
            (dreq,) = decode.requests
            assert dreq.room_id == "" and list(dreq.prompt_token_ids) == expected
            assert out[-1].finish_reason == common_pb2.FINISH_REASON_STOP and out[-1].stop_token_id == stop
            assert dreq.sampling.max_tokens == 8
            out = await mesh.generate(token_ids=gateway_pb2.TokenIds(ids=[5, 6, 7]))
            assert len(out) == 16  # SamplingParams' default max_tokens, filled in by the gateway

    asyncio.run(main())


@pytest.mark.parametrize(("request_fields", "match"), [
    ({"prompt": "hi", "sampling": common_pb2.SamplingParams(temperature=-1)}, "temperature"),
    ({"prompt": "hi", "sampling": common_pb2.SamplingParams(top_p=0)}, "top_p"),
    ({"prompt": "hi", "sampling": common_pb2.SamplingParams(max_tokens=2, min_tokens=5)}, "min_tokens"),
    ({"prompt": ""}, "prompt must not be empty"),
    ({}, "set one of prompt, token_ids or messages"),
    ({"token_ids": gateway_pb2.TokenIds(ids=[])}, "token_ids must not be empty"),
    ({"token_ids": gateway_pb2.TokenIds(ids=[1, VOCAB])}, "outside the vocabulary"),
    ({"token_ids": gateway_pb2.TokenIds(ids=[1] * MAX_MODEL_LEN)}, "context limit is 256"),
    ({"prompt": "word " * 300}, "context limit"),
    ({"messages": gateway_pb2.ChatMessages()}, "messages must not be empty"),
])
def test_invalid_requests(model_dir: Path, request_fields: dict, match: str) -> None:
    async def main() -> None:
        async with Mesh(model_dir) as mesh:
            decode = FakeDecode()
            await mesh.add(decode, "d1")
            with pytest.raises(grpc.aio.AioRpcError) as excinfo:
                await mesh.generate(**request_fields)
            code, details = _rpc_error(excinfo)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and match in details
            assert decode.requests == []

    asyncio.run(main())


def test_unknown_model_tokenize_and_list_models(model_dir: Path) -> None:
    async def main() -> None:
        async with Mesh(model_dir) as mesh:
            with pytest.raises(grpc.aio.AioRpcError) as excinfo:
                await mesh.generate(prompt="hi", model="gpt-5")
            assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND
            resp = await mesh.stub.Tokenize(gateway_pb2.TokenizeRequest(text="hello", add_special_tokens=True))
            assert list(resp.token_ids) == mesh.app.model.tokenizer.encode("hello")
            assert resp.max_model_len == MAX_MODEL_LEN
            await mesh.add(FakeDecode(), "d1")
            await mesh.add(FakePrefill(), "p1")
            await mesh.add(FakePrefill(), "p2")
            (info,) = (await mesh.stub.ListModels(gateway_pb2.ListModelsRequest())).models
            assert (info.id, info.max_model_len, info.num_prefill_workers, info.num_decode_workers) == (
                "tok", MAX_MODEL_LEN, 2, 1)

    asyncio.run(main())


def test_no_decode_worker_is_unavailable(model_dir: Path) -> None:
    async def main() -> None:
        async with Mesh(model_dir) as mesh:
            with pytest.raises(grpc.aio.AioRpcError) as excinfo:
                await mesh.generate(prompt="hi")
            assert _rpc_error(excinfo) == (grpc.StatusCode.UNAVAILABLE, "no decode workers registered")

    asyncio.run(main())


def test_routing_follows_load_draining_and_heartbeat_timeouts(model_dir: Path) -> None:
    async def main() -> None:
        async with Mesh(model_dir) as mesh:
            roomy, tight = FakeDecode(), FakeDecode()
            a = await mesh.add(roomy, "roomy", load=common_pb2.WorkerLoad(num_free_pages=90))
            await mesh.add(tight, "tight", load=common_pb2.WorkerLoad(num_free_pages=10))
            await mesh.generate(prompt="hi")
            assert (len(roomy.requests), len(tight.requests)) == (1, 0)
            a.draining = True
            await a.heartbeat()
            await mesh.generate(prompt="hi")
            assert (len(roomy.requests), len(tight.requests)) == (1, 1)
            a.draining = False
            await a.heartbeat()
            a.heartbeats = False  # silent: dropped after heartbeat_timeout_ms (400 ms)
            await _wait_for(lambda: mesh.app.registry.get("roomy") is None)
            await mesh.generate(prompt="hi")
            assert (len(roomy.requests), len(tight.requests)) == (1, 2)
            a.heartbeats = True  # its next heartbeat is answered known=false: it registers again
            await _wait_for(lambda: mesh.app.registry.get("roomy") is not None)
            assert a.registrations == 2
            await mesh.generate(prompt="hi")
            assert (len(roomy.requests), len(tight.requests)) == (2, 2)

    asyncio.run(main())


@pytest.mark.parametrize(("argv", "env", "expected"), [
    ([], {}, ["roomy"] * 4),  # prefix_affinity, the default: the roomy worker every time
    ([], {"MOEMESH_ROUTER": "round_robin"}, ["roomy", "tight"] * 2),
    (["--router", "least_load"], {"MOEMESH_ROUTER": "round_robin"}, ["roomy"] * 4),  # the flag wins
])
def test_the_router_option_reaches_the_gateway(model_dir: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str],
                                               env: dict[str, str], expected: list[str]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    parser = argparse.ArgumentParser()
    add_arguments(parser)  # reads MOEMESH_ROUTER now
    router = config_from_args(parser.parse_args(argv)).router

    async def main() -> None:
        async with Mesh(model_dir, router=router) as mesh:
            workers = {"roomy": FakeDecode(), "tight": FakeDecode()}
            await mesh.add(workers["roomy"], "roomy", load=common_pb2.WorkerLoad(num_free_pages=90))
            await mesh.add(workers["tight"], "tight", load=common_pb2.WorkerLoad(num_free_pages=10))
            chosen = []
            for _ in range(4):
                before = {name: len(w.requests) for name, w in workers.items()}
                await mesh.generate(prompt="hi")
                chosen += [name for name, w in workers.items() if len(w.requests) > before[name]]
            assert chosen == expected

    asyncio.run(main())


def test_client_cancel_cancels_and_aborts_both_workers(model_dir: Path) -> None:
    async def main() -> None:
        async with Mesh(model_dir) as mesh:
            decode, prefill = FakeDecode(token_delay_s=0.05), FakePrefill()
            await mesh.add(decode, "d1")
            await mesh.add(prefill, "p1")
            call = mesh.stub.Generate(gateway_pb2.GenerateRequest(
                prompt="hi", request_id="cancel-me", sampling=common_pb2.SamplingParams(max_tokens=200)))
            for _ in range(2):
                assert (await call.read()).token_ids
            call.cancel()
            await asyncio.wait_for(decode.cancelled.wait(), 5)
            await asyncio.wait_for(decode.aborted.wait(), 5)
            await asyncio.wait_for(prefill.aborted.wait(), 5)
            assert decode.aborts == prefill.aborts and len(decode.aborts) == 1
            assert decode.aborts[0].startswith("cancel-me@")
            await _wait_for(lambda: all(w.in_flight == 0 for w in mesh.app.registry.workers()))

    asyncio.run(main())


def test_client_deadline_reaches_the_workers(model_dir: Path) -> None:
    async def main() -> None:
        async with Mesh(model_dir) as mesh:
            decode = FakeDecode(hang=True)
            await mesh.add(decode, "d1")
            with pytest.raises(grpc.aio.AioRpcError) as excinfo:
                await mesh.generate(prompt="hi", timeout=0.5)
            assert excinfo.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert 0 < decode.deadlines[0] <= 0.55  # gRPC rounds timeouts on the wire
            await asyncio.wait_for(decode.cancelled.wait(), 5)

    asyncio.run(main())


def test_default_deadline_when_the_client_sets_none(model_dir: Path) -> None:
    async def main() -> None:
        async with Mesh(model_dir, default_request_timeout_s=0.3) as mesh:
            decode = FakeDecode(hang=True)
            await mesh.add(decode, "d1")
            with pytest.raises(grpc.aio.AioRpcError) as excinfo:
                await mesh.generate(prompt="hi", request_id="slow")
            code, details = _rpc_error(excinfo)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "slow" in details and "d1" in details
            assert decode.deadlines[0] <= 0.35

    asyncio.run(main())


def test_failed_prefill_cancels_decode_and_the_request_moves_on(model_dir: Path) -> None:
    async def main() -> None:
        async with Mesh(model_dir) as mesh:
            decode = FakeDecode(hang=True)
            await mesh.add(decode, "d1")
            p = await mesh.add(FakePrefill(delay_s=0.1, fail_code=grpc.StatusCode.UNAVAILABLE), "p1")
            with pytest.raises(grpc.aio.AioRpcError) as excinfo:
                await mesh.generate(prompt="hi", timeout=1)  # waited out in full: the decode worker hangs
            # The failed prefill's decode call was cancelled and aborted; the request then ran colocated on
            # the (hanging) decode worker until its deadline.
            await asyncio.wait_for(decode.cancelled.wait(), 5)
            await asyncio.wait_for(decode.aborted.wait(), 5)
            assert excinfo.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert [r.room_id != "" for r in decode.requests] == [True, False]
            p.servicer.fail_code = grpc.StatusCode.RESOURCE_EXHAUSTED
            await _wait_for(lambda: mesh.app.registry.get("p1").routable)
            with pytest.raises(grpc.aio.AioRpcError) as excinfo:
                await mesh.generate(prompt="hi")
            code, details = _rpc_error(excinfo)  # a worker's own status is relayed, worker named
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "p1" in details

    asyncio.run(main())


@pytest.mark.parametrize("peer_failure", [True, False])
def test_a_worker_reporting_a_peer_failure_stays_routable(model_dir: Path, peer_failure: bool) -> None:
    # UNAVAILABLE marked as a peer's failure (a failed KV handoff) says nothing against the worker that
    # answered; a plain UNAVAILABLE takes it out of routing until its next heartbeat.
    async def main() -> None:
        async with Mesh(model_dir, heartbeat_timeout_ms=5000) as mesh:
            decode = FakeDecode(token_delay_s=0.05)
            await mesh.add(decode, "d1")
            prefill = FakePrefill(fail_code=grpc.StatusCode.UNAVAILABLE, peer_failure=peer_failure)
            p = await mesh.add(prefill, "p1")
            p.heartbeats = False  # no heartbeat may set it routable again during the test
            responses = await mesh.generate(prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=5),
                                            timeout=10)
            # The request went PD first (the prefill worker got it, with a room), left the failed handoff and
            # ran colocated on the decode worker, whole. The failed prefill cancels the PD attempt's decode
            # call at once, so that call reaches the decode worker or not, as the race goes: both are right.
            [pd] = prefill.requests
            assert pd.room_id
            assert sum(len(r.token_ids) for r in responses) == 5
            assert [r.room_id for r in decode.requests] in ([pd.room_id, ""], [""])
            assert mesh.app.registry.get("p1").routable is peer_failure
            assert mesh.app.registry.get("d1").routable

    asyncio.run(main())


def test_prefill_worker_gone_the_decode_worker_prefills(model_dir: Path) -> None:
    async def main() -> None:
        async with Mesh(model_dir, heartbeat_timeout_ms=5000) as mesh:
            decode = FakeDecode()
            await mesh.add(decode, "d1")
            gone = await mesh.add(FakePrefill(), "p1")
            gone.heartbeats = False
            await gone._server.stop(0)
            # First request: the prefill call fails, the request moves on and runs colocated; the
            # second is routed colocated at once (the dead prefill worker is marked unhealthy).
            for _ in range(2):
                responses = await mesh.generate(prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=3),
                                                timeout=10)
                assert sum(len(r.token_ids) for r in responses) == 3
                assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
                assert decode.requests[-1].room_id == ""

    asyncio.run(main())


def test_core_api_for_a_rest_facade(model_dir: Path) -> None:
    """GatewayCore without gRPC servicers: errors raise in open(), aclose() cancels and aborts."""
    from moemesh.service.errors import InvalidArgument, Unavailable

    async def main() -> None:
        async with Mesh(model_dir) as mesh:
            core = mesh.app.core
            with pytest.raises(Unavailable):
                core.open(gateway_pb2.GenerateRequest(prompt="hi"))
            decode = FakeDecode(token_delay_s=0.05)
            await mesh.add(decode, "d1")
            with pytest.raises(InvalidArgument, match="top_p"):
                core.open(gateway_pb2.GenerateRequest(prompt="hi", sampling=common_pb2.SamplingParams(top_p=2)))
            stream = core.open(gateway_pb2.GenerateRequest(
                prompt="hi", request_id="rest-1", sampling=common_pb2.SamplingParams(max_tokens=200)), timeout_s=10)
            first = await stream.__anext__()
            assert first.request_id == "rest-1" and first.token_ids
            await stream.aclose()  # the HTTP client went away
            await asyncio.wait_for(decode.cancelled.wait(), 5)
            await asyncio.wait_for(decode.aborted.wait(), 5)

    asyncio.run(main())
