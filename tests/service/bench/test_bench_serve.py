"""`moemesh bench serve` / `bench plot`: SSE parsing, metric math, prompts, and the client end to end
against a stub OpenAI-compatible server on loopback (a test double: a stdlib HTTP server that streams
canned chunks; it is not moemesh's REST facade)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from moemesh.bench.serve_client import SSEParser, build_payload, chunk_text
from moemesh.bench.serve_data import PromptMaker
from moemesh.bench.serve_metrics import SLO, RequestResult, per_request, stats_ms, summarize
from moemesh.bench.serve_plot import compare_table, load_runs
from moemesh.model.tiny_tokenizer import build_tiny_tokenizer
from moemesh.model.tokenizer import Tokenizer
from moemesh.services.cli.main import main

# ---- SSE parsing -------------------------------------------------------------------------------


def test_sse_events_split_anywhere() -> None:
    stream = b'data: {"a": 1}\n\n: a comment\nevent: x\ndata: {"b": 2}\n\ndata: [DONE]\n\n'
    whole = SSEParser().feed(stream)
    assert whole == ['{"a": 1}', '{"b": 2}', "[DONE]"]
    for size in (1, 2, 3, 7):  # the same events whatever the network's chunking
        p = SSEParser()
        got = [e for i in range(0, len(stream), size) for e in p.feed(stream[i:i + size])]
        assert got + p.close() == whole


def test_sse_line_endings_multiline_and_unterminated() -> None:
    p = SSEParser()
    assert p.feed(b"data: one\r\ndata:two\r\n\r\ndata: x\r") == ["one\ntwo"]
    assert p.feed(b"\n\r\n") == ["x"]  # a CR at the end of a read waits for its LF
    assert p.feed(b"data: a\rdata: b\r\rdata: last") == ["a\nb"]  # bare CR ends lines too
    assert p.close() == ["last"]  # a stream that ends without the blank line still yields its event
    assert p.close() == []


def test_sse_utf8_split_across_reads() -> None:
    data = 'data: {"text": "é…"}\n\n'.encode()
    p = SSEParser()
    got = p.feed(data[:17]) + p.feed(data[17:])
    assert json.loads(got[0]) == {"text": "é…"}


def test_chunk_text_and_payload() -> None:
    assert chunk_text({"choices": [{"text": "ab"}]}) == "ab"
    assert chunk_text({"choices": [{"delta": {"role": "assistant"}}]}) == ""
    assert chunk_text({"choices": [{"delta": {"content": "x", "reasoning_content": "r"}}]}) == "rx"
    assert chunk_text({"choices": [], "usage": {"completion_tokens": 3}}) == ""
    body = build_payload("/v1/completions", "hi", 8, model="m", ignore_eos=True, temperature=0.0, extra={"top_k": 1})
    assert body == {"model": "m", "prompt": "hi", "max_tokens": 8, "temperature": 0.0, "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": True, "top_k": 1}
    chat = build_payload("/v1/chat/completions", "hi", 8, model=None, ignore_eos=False, temperature=1.0)
    assert chat["messages"] == [{"role": "user", "content": "hi"}] and "model" not in chat and "ignore_eos" not in chat
    with pytest.raises(ValueError):
        build_payload("/v1/chat/completions", [1, 2], 8, model=None, ignore_eos=False, temperature=0.0)


# ---- metric math -------------------------------------------------------------------------------


def _ok(ttft: float, gaps: list[float], prompt_len: int = 100, out: int | None = None) -> RequestResult:
    n = len(gaps) + 1 if out is None else out
    return RequestResult(prompt_len=prompt_len, output_len=n, success=True, ttft_s=ttft, itl_s=gaps,
                         e2e_s=ttft + sum(gaps), output_tokens=n, chunks=len(gaps) + 1)


def test_metrics_on_synthetic_timings() -> None:
    r1 = _ok(0.1, [0.1] * 9)  # e2e 1.0 s, TPOT 0.1 s
    r2 = _ok(0.3, [0.2] * 9)  # e2e 2.1 s, TPOT 0.2 s
    r3 = RequestResult(prompt_len=100, output_len=10, error="HTTP 500: boom")
    assert r1.tpot_s == pytest.approx(0.1) and r2.tpot_s == pytest.approx(0.2) and r3.tpot_s is None
    s = summarize([r1, r2, r3], duration_s=2.0, slo=SLO(ttft_ms=200), percentiles=[50, 90, 99])
    assert (s["completed"], s["failed"]) == (2, 1)
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(10.0)
    assert s["input_throughput"] == pytest.approx(100.0)
    assert s["total_token_throughput"] == pytest.approx(110.0)
    assert s["concurrency"] == pytest.approx((1.0 + 2.1) / 2.0)
    assert s["mean_ttft_ms"] == pytest.approx(200.0) and s["median_ttft_ms"] == pytest.approx(200.0)
    assert s["p99_ttft_ms"] == pytest.approx(100 + 0.99 * 200)  # linear interpolation, as numpy
    assert s["mean_tpot_ms"] == pytest.approx(150.0)
    assert s["mean_itl_ms"] == pytest.approx(150.0)  # 18 gaps, half 100 ms, half 200 ms
    assert s["median_itl_ms"] == pytest.approx(150.0)
    assert s["p90_itl_ms"] == pytest.approx(200.0)
    assert s["mean_e2el_ms"] == pytest.approx(1550.0)
    assert s["good_requests"] == 1 and s["goodput"] == pytest.approx(0.5)
    both = summarize([r1, r2], 2.0, SLO(ttft_ms=400, tpot_ms=150))
    assert both["good_requests"] == 1  # r2 meets the TTFT SLO but not the TPOT one
    assert summarize([r1, r2], 2.0)["goodput"] is None  # no SLO, no goodput


def test_metrics_edge_cases() -> None:
    single = _ok(0.05, [], out=1)
    assert single.tpot_s is None  # no TPOT with one output token...
    s = summarize([single], 1.0, SLO(tpot_ms=1))
    assert s["mean_tpot_ms"] is None and s["good_requests"] == 1  # ...so a TPOT SLO cannot fail it
    assert stats_ms([], [99]) == dict.fromkeys(["mean_ms", "median_ms", "std_ms", "min_ms", "max_ms", "p99_ms"])
    assert stats_ms([0.001, 0.003], [50, 99.9])["p99_9_ms"] == pytest.approx(2.998)
    empty = summarize([RequestResult(prompt_len=1, output_len=1, error="x")], 1.0)
    assert empty["completed"] == 0 and empty["mean_ttft_ms"] is None and empty["output_throughput"] == 0
    # ignore_eos checks: a short output and a server prompt count that disagrees are both counted
    short = _ok(0.1, [0.1] * 3, out=4)
    short.output_len = 8
    short.usage_prompt_tokens = 99
    s = summarize([short, _ok(0.1, [0.1])], 1.0, ignore_eos=True)
    assert s["output_len_mismatches"] == 1 and s["prompt_len_mismatches"] == 1
    arrays = per_request([short, RequestResult(prompt_len=5, output_len=2, error="boom")])
    assert arrays["ttfts"] == [0.1, None] and arrays["itls"][1] == [] and arrays["errors"] == ["", "boom"]
    assert {len(v) for v in arrays.values()} == {2}


# ---- prompts -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(d)
    return d


def test_random_prompts_have_exact_lengths(tok_dir: Path) -> None:
    tok = Tokenizer.from_dir(tok_dir)
    maker = PromptMaker(tok)
    prompts = maker.random(8, 128, 16, seed=3)
    assert all(p.prompt_len == 128 == len(tok.encode(p.prompt)) for p in prompts)  # BOS included
    assert len({p.prompt for p in prompts}) == 8 and all(p.output_len == 16 for p in prompts)
    assert [p.prompt for p in maker.random(8, 128, 16, seed=3)] == [p.prompt for p in prompts]  # seeded
    chat = PromptMaker(tok, chat=True).random(3, 64, 4, seed=0)
    assert chat[0].prompt_len == 64 and chat[0].prompt != prompts[0].prompt
    ids = PromptMaker(tok, ids=True).random(2, 50, 4, seed=0)
    assert isinstance(ids[0].prompt, list) and len(ids[0].prompt) == ids[0].prompt_len == 50
    varied = maker.random(20, 100, 10, seed=1, range_ratio=0.5)
    assert all(50 <= p.prompt_len <= 150 and 5 <= p.output_len <= 15 for p in varied)
    assert len({p.prompt_len for p in varied}) > 1


def test_jsonl_dataset(tok_dir: Path, tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(o) for o in [
        {"prompt": "the world is", "output_len": 5},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]},
        {"conversations": [{"from": "human", "value": "good day"}, {"from": "gpt", "value": "ok"}]},
    ]) + "\n")
    maker = PromptMaker(Tokenizer.from_dir(tok_dir))
    got = maker.from_jsonl(f, 4, output_len=7)
    assert [p.prompt for p in got] == ["the world is", "hello there", "good day", "the world is"]
    assert [p.output_len for p in got] == [5, 7, 7, 5]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nothing": 1}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        maker.from_jsonl(bad, 1, 7)


# ---- the client against a stub server ----------------------------------------------------------


class StubOpenAI(ThreadingHTTPServer):
    """Test double of an OpenAI-compatible server: streams `max_tokens` one-token chunks `w0 w1 ...`,
    counts prompts with the tiny tokenizer for `usage`, and records what it was sent."""

    daemon_threads = True

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(("127.0.0.1", 0), _StubHandler)
        self.tok = tokenizer
        self.bodies: list[dict[str, Any]] = []
        self.inflight = 0
        self.max_inflight = 0
        self.lock = threading.Lock()
        self.delay_s = 0.002
        self.mode = "ok"  # ok | http-error | stream-error | no-done
        self.health_503 = 0  # GET /health answers 503 this many times first
        self.root: str | None = None  # the `root` GET /v1/models reports for its model (None: no such key)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _StubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: StubOpenAI

    def log_message(self, *args: Any) -> None:
        pass

    def _json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_GET(self) -> None:
        if self.path == "/health":  # 503 while "loading", as vLLM and moemesh answer
            with self.server.lock:
                loading = self.server.health_503 > 0
                self.server.health_503 -= 1
            self._json(503 if loading else 200, {"status": "loading" if loading else "ok"})
        elif self.path == "/v1/models":
            root = {} if self.server.root is None else {"root": self.server.root}
            self._json(200, {"object": "list", "data": [{"id": "stub-model", "object": "model", **root}]})
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.bodies.append(body)
            srv.inflight += 1
            srv.max_inflight = max(srv.max_inflight, srv.inflight)
        self._counted = True
        try:
            self._serve(srv, body)
        finally:
            self._release(srv)

    def _release(self, srv: StubOpenAI) -> None:
        """No longer in flight (once): called before the response's last bytes go out, since the client may
        send its next request as soon as it has read them, before this thread gets to run again."""
        if self._counted:
            self._counted = False
            with srv.lock:
                srv.inflight -= 1

    def _serve(self, srv: StubOpenAI, body: dict[str, Any]) -> None:
        if srv.mode == "http-error":
            self._json(400, {"error": {"message": "max_tokens is too large", "type": "BadRequestError"}})
            return
        chat = self.path == "/v1/chat/completions"
        if chat:
            rendered = srv.tok.apply_chat_template(body["messages"])
            prompt_tokens = len(srv.tok.encode(rendered))
        else:
            prompt = body["prompt"]
            prompt_tokens = len(prompt) if isinstance(prompt, list) else len(srv.tok.encode(prompt))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        n = body["max_tokens"]

        def event(obj: dict[str, Any]) -> bytes:
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        if chat:  # OpenAI's first chat chunk carries the role and no content
            self._chunk(event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}))
        for i in range(n):
            time.sleep(srv.delay_s)
            if srv.mode == "stream-error" and i == 2:
                self._chunk(event({"error": {"message": "the worker died", "code": 500}}))
                break
            piece = {"delta": {"content": f"w{i} "}} if chat else {"text": f"w{i} "}
            last = i == n - 1
            data = event({"choices": [{"index": 0, **piece, "finish_reason": "length" if last else None}]})
            self._chunk(data[:9])  # an event split across two writes
            self._chunk(data[9:])
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        self._release(srv)
        self._chunk(event({"choices": [], "usage": usage}))
        if srv.mode != "no-done":
            self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")


@pytest.fixture()
def stub(tok_dir: Path) -> Any:
    srv = StubOpenAI(Tokenizer.from_dir(tok_dir))
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def _bench(stub: StubOpenAI, tok_dir: Path, tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "r.json"
    out.unlink(missing_ok=True)
    rc = main(["bench", "serve", "--url", stub.url, "--tokenizer", str(tok_dir), "--input-len", "64",
               "--output-len", "6", "--num-prompts", "6", "--disable-tqdm", "--result-json", str(out), *extra])
    return rc, json.loads(out.read_text()) if out.exists() else {}


def test_client_end_to_end(stub: StubOpenAI, tok_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, doc = _bench(stub, tok_dir, tmp_path, "--max-concurrency", "2", "--warmup", "2", "--ignore-eos",
                     "--label", "stub", "--slo-ttft-ms", "10000", "--slo-tpot-ms", "10000")
    assert rc == 0
    table = capsys.readouterr().out
    assert "Serving Benchmark Result" in table and "Successful requests:                    6" in table
    assert "Mean TTFT (ms):" in table and "P99 ITL (ms):" in table and "Request goodput (req/s):" in table
    assert len(stub.bodies) == 8  # two warm-up requests, not measured
    assert stub.max_inflight <= 2
    sent = stub.bodies[-1]
    assert sent["model"] == "stub-model" and sent["stream"] is True and sent["ignore_eos"] is True
    assert sent["max_tokens"] == 6 and sent["temperature"] == 0.0 and sent["stream_options"] == {"include_usage": True}
    assert set(doc) == {"label", "date", "tool", "config", "summary", "requests"} and doc["label"] == "stub"
    assert doc["config"]["model"] == "stub-model" and doc["config"]["tokenizer"] == str(tok_dir)
    s = doc["summary"]
    assert (s["completed"], s["failed"], s["total_input_tokens"], s["total_output_tokens"]) == (6, 0, 384, 36)
    assert s["prompt_len_mismatches"] == 0 and s["output_len_mismatches"] == 0 and s["usage_reported"] == 6
    assert s["good_requests"] == 6 and s["goodput"] == pytest.approx(s["request_throughput"])
    for m in ("ttft", "tpot", "itl", "e2el"):
        assert s[f"mean_{m}_ms"] > 0 and s[f"p99_{m}_ms"] >= s[f"median_{m}_ms"]
    req = doc["requests"]
    assert {len(v) for v in req.values()} == {6}
    assert req["chunks"] == [6] * 6 and all(len(gaps) == 5 for gaps in req["itls"])
    assert req["usage_prompt_tokens"] == [64] * 6 and req["finish_reasons"] == ["length"] * 6
    assert all(e > t > 0 for e, t in zip(req["e2els"], req["ttfts"], strict=True))


def test_client_chat_and_poisson(stub: StubOpenAI, tok_dir: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    rc, doc = _bench(stub, tok_dir, tmp_path, "--endpoint", "/v1/chat/completions", "--request-rate", "200",
                     "--warmup", "0")
    assert rc == 0 and time.monotonic() - t0 < 30
    assert "messages" in stub.bodies[0] and len(stub.bodies) == 6
    req = doc["requests"]
    assert req["input_lens"] == req["usage_prompt_tokens"] == [64] * 6  # the chat template counted alike
    assert req["chunks"] == [6] * 6  # the role-only first chunk is no token
    assert req["send_times"] == sorted(req["send_times"]) and req["send_times"][-1] > 0


@pytest.mark.parametrize(("mode", "error"), [("http-error", "HTTP 400: max_tokens is too large"),
                                             ("stream-error", "error in the stream: the worker died"),
                                             ("no-done", "without `data: [DONE]`")])
def test_client_reports_failures(stub: StubOpenAI, tok_dir: Path, tmp_path: Path, mode: str, error: str) -> None:
    stub.mode = mode
    rc, doc = _bench(stub, tok_dir, tmp_path, "--warmup", "0")
    assert rc == 1  # a run with failed requests is no valid measurement
    assert doc["summary"]["failed"] == 6 and doc["summary"]["completed"] == 0
    assert all(error in e for e in doc["requests"]["errors"])


def test_client_warmup_failure_stops_early(stub: StubOpenAI, tok_dir: Path, tmp_path: Path) -> None:
    stub.mode = "http-error"
    rc, doc = _bench(stub, tok_dir, tmp_path, "--warmup", "1")
    assert rc == 1 and doc == {} and len(stub.bodies) == 1


def test_request_timeout(stub: StubOpenAI, tok_dir: Path, tmp_path: Path) -> None:
    stub.delay_s = 0.2
    rc, doc = _bench(stub, tok_dir, tmp_path, "--warmup", "0", "--request-timeout", "0.3", "--num-prompts", "2")
    assert rc == 1 and all("timed out" in e for e in doc["requests"]["errors"])


def test_wait_for_readiness(stub: StubOpenAI, tok_dir: Path, tmp_path: Path) -> None:
    # The benchmark polls /health every 0.5 s: two "loading" answers, then ready.
    stub.health_503 = 2
    rc, doc = _bench(stub, tok_dir, tmp_path, "--wait", "30", "--num-prompts", "2")
    assert rc == 0 and stub.health_503 < 0 and doc["config"]["served_models"] == ["stub-model"]
    stub.health_503 = 1000
    rc, doc = _bench(stub, tok_dir, tmp_path, "--wait", "0.2", "--num-prompts", "2", "--model", "m")
    assert rc == 2 and doc == {}  # not ready in time: no requests sent


def test_the_tokenizer_is_the_served_models_root_or_the_run_stops(stub: StubOpenAI, tok_dir: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "r.json"

    def bench(*extra: str) -> int:
        out.unlink(missing_ok=True)
        return main(["bench", "serve", "--url", stub.url, "--input-len", "16", "--output-len", "2", "--num-prompts",
                     "2", "--warmup", "0", "--disable-tqdm", "--result-json", str(out), *extra])

    stub.root = str(tok_dir)  # as `moemesh up --model DIR` reports it: the folder, not the model's name
    assert bench() == 0
    assert json.loads(out.read_text())["config"]["tokenizer"] == str(tok_dir)
    capsys.readouterr()
    stub.root = str(tmp_path / "elsewhere")  # a folder of the server's machine, not this one
    assert bench() == 2 and not out.exists()
    err = capsys.readouterr().err
    assert f"serves 'stub-model' from {tmp_path / 'elsewhere'}, which is no tokenizer folder" in err
    assert "--tokenizer" in err
    stub.root = None  # a server that says nothing: no guess (the embedded tiny model's counts would be wrong)
    assert bench() == 2 and "reports no folder (`root`) for its model 'stub-model'" in capsys.readouterr().err
    assert bench("--model", "other") == 2  # the only model served, under another name: its (missing) root
    assert "reports no folder (`root`) for its model 'stub-model'" in capsys.readouterr().err
    assert bench("--tokenizer", str(tok_dir)) == 0  # the way out the errors name
    assert stub.bodies and all(b["model"] == "stub-model" for b in stub.bodies)


def test_bad_arguments(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "serve", "--request-rate", "0"]) == 2
    assert main(["bench", "serve", "--prompt-format", "ids", "--endpoint", "/v1/chat/completions"]) == 2
    assert "needs --endpoint /v1/completions" in capsys.readouterr().err


# ---- plot and compare --------------------------------------------------------------------------


def test_compare_table_and_plot(stub: StubOpenAI, tok_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, doc = _bench(stub, tok_dir, tmp_path, "--warmup", "0", "--label", "a")
    assert rc == 0
    first = tmp_path / "a.json"
    second = tmp_path / "b.json"
    first.write_text(json.dumps(doc))
    doc["label"] = "b"
    doc["summary"]["output_throughput"] /= 2
    second.write_text(json.dumps(doc))
    table = compare_table(load_runs([str(first), str(second)]))
    line = next(x for x in table.splitlines() if x.startswith("Output tok/s"))
    assert line.split()[-1] == "2.00x" and "a/b" in table.splitlines()[0]
    capsys.readouterr()
    assert main(["bench", "plot", str(first), str(second)]) == 0  # no --out: the table only
    assert "Mean TTFT (ms)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="not a `moemesh bench serve` result"):
        (tmp_path / "x.json").write_text("{}")
        load_runs([str(tmp_path / "x.json")])
    pytest.importorskip("matplotlib", reason="plots need matplotlib (the `bench` extra)")
    png = tmp_path / "cmp.png"
    assert main(["bench", "plot", str(first), str(second), "--out", str(png), "--labels", "moemesh,vllm"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    single = tmp_path / "single.png"
    rc, _ = _bench(stub, tok_dir, tmp_path, "--warmup", "0", "--plot", str(single))
    assert rc == 0 and single.read_bytes()[:4] == b"\x89PNG"
