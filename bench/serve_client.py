"""The HTTP side of `moemesh bench serve`: one streamed OpenAI request, timed chunk by chunk.

Talks to any OpenAI-compatible server (moemesh's REST facade, vLLM, SGLang, ...) with httpx. The
stream is Server-Sent Events: `data: {json}` events separated by blank lines, ending with
`data: [DONE]`. Chunks are timed when their bytes arrive, before any JSON is parsed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx

from moemesh.bench.serve_metrics import RequestResult

DONE = "[DONE]"


class SSEParser:
    """Incremental Server-Sent Events parser: feed it bytes as they come, get the `data` of each event.

    Follows the SSE format: lines end with LF, CRLF or CR; a blank line ends an event; `data:` lines of
    one event are joined with LF; one space after the colon is dropped; lines starting with `:` are
    comments; other fields (`event:`, `id:`, `retry:`) are ignored.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        events: list[str] = []
        while True:
            cut = _line_end(self._buf)
            if cut is None:
                break
            end, after = cut
            line = self._buf[:end].decode("utf-8", errors="replace")
            self._buf = self._buf[after:]
            self._line(line, events)
        return events

    def close(self) -> list[str]:
        """The events still pending at the end of the stream (a last line without its newline or blank line)."""
        events: list[str] = []
        if self._buf:
            line = self._buf.decode("utf-8", errors="replace")
            self._buf = b""
            self._line(line, events)
        if self._data:
            events.append("\n".join(self._data))
            self._data = []
        return events

    def _line(self, line: str, events: list[str]) -> None:
        if line == "":
            if self._data:
                events.append("\n".join(self._data))
                self._data = []
            return
        if line.startswith(":"):
            return
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)


def _line_end(buf: bytes) -> tuple[int, int] | None:
    """(end of the first line, start of the next) in `buf`, or None if no line is complete yet."""
    lf = buf.find(b"\n")
    cr = buf.find(b"\r")
    if cr == -1 or (lf != -1 and lf < cr):
        return None if lf == -1 else (lf, lf + 1)
    if cr == len(buf) - 1:
        return None  # a CR at the end: wait, an LF may follow
    return (cr, cr + 2) if buf[cr + 1:cr + 2] == b"\n" else (cr, cr + 1)


def build_payload(endpoint: str, prompt: str | list[int], output_len: int, *, model: str | None,
                  ignore_eos: bool, temperature: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The request body: streamed, greedy by default, exactly `output_len` tokens with `ignore_eos`.

    `stream_options.include_usage` asks for the server's token counts, to check against ours.
    """
    body: dict[str, Any] = {}
    if model:
        body["model"] = model
    if endpoint.endswith("chat/completions"):
        if not isinstance(prompt, str):
            raise ValueError("token-id prompts need /v1/completions; chat takes text")
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    body.update({"max_tokens": output_len, "temperature": temperature, "stream": True,
                 "stream_options": {"include_usage": True}})
    if ignore_eos:
        body["ignore_eos"] = True
    body.update(extra or {})
    return body


def chunk_text(obj: dict[str, Any]) -> str:
    """The output text of one streamed chunk: completions' `text` or chat's `delta.content`
    (and a reasoning model's `delta.reasoning_content` / `delta.reasoning`, which are output too)."""
    text = ""
    for choice in obj.get("choices") or []:
        if "text" in choice:
            text += choice.get("text") or ""
        delta = choice.get("delta") or {}
        for key in ("reasoning_content", "reasoning", "content"):
            text += delta.get(key) or ""
    return text


async def send_request(client: httpx.AsyncClient, url: str, payload: dict[str, Any], result: RequestResult,
                       *, headers: dict[str, str] | None = None, timeout_s: float = 600,
                       count_tokens: Callable[[str], int] | None = None, t_zero: float = 0.0) -> RequestResult:
    """Send one streamed request and fill `result` with its timings; never raises for a failed request.

    `count_tokens` counts the output when the server sends no usage; `t_zero` is the run's start
    (`time.perf_counter`), for `result.send_s`.
    """
    start = time.perf_counter()
    result.send_s = start - t_zero
    try:
        await asyncio.wait_for(_stream(client, url, payload, result, headers, start), timeout_s)
    except asyncio.TimeoutError:
        result.success, result.error = False, f"timed out after {timeout_s:g} s"
    except httpx.HTTPError as e:
        result.success, result.error = False, f"{type(e).__name__}: {e}"
    if result.success:
        if result.usage_output_tokens is not None:
            result.output_tokens = result.usage_output_tokens
        elif count_tokens is not None:
            result.output_tokens = count_tokens(result.text)
        else:
            result.output_tokens = result.chunks
    return result


async def _stream(client: httpx.AsyncClient, url: str, payload: dict[str, Any], result: RequestResult,
                  headers: dict[str, str] | None, start: float) -> None:
    async with client.stream("POST", url, json=payload, headers=headers) as resp:
        if resp.status_code != 200:
            body = (await resp.aread()).decode("utf-8", errors="replace")
            result.error = f"HTTP {resp.status_code}: {_error_message(body)}"
            return
        parser = SSEParser()
        last = start
        texts: list[str] = []
        done = False
        async for chunk in resp.aiter_bytes():
            now = time.perf_counter()
            for data in parser.feed(chunk):
                if done:
                    break
                if data.strip() == DONE:
                    done = True
                    break
                error = _event(data, result, texts)
                if error:
                    result.error = error
                    return
                if texts and len(texts) > result.chunks:  # this event carried output text
                    if result.chunks == 0:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    result.chunks = len(texts)
                    last = now
            if done:
                break
        if not done:
            for data in parser.close():
                if data.strip() == DONE:
                    done = True
        result.e2e_s = time.perf_counter() - start
        result.text = "".join(texts)
        if not done:
            result.error = "the stream ended without `data: [DONE]`"
        elif result.chunks == 0:
            result.error = "the stream carried no output text"
        else:
            result.success = True


def _event(data: str, result: RequestResult, texts: list[str]) -> str:
    """Apply one event to `result` (text to `texts`); returns an error message, or "" if all is well."""
    try:
        obj = json.loads(data)
    except json.JSONDecodeError:
        return f"not JSON in the stream: {data[:200]!r}"
    if not isinstance(obj, dict):
        return f"unexpected event in the stream: {data[:200]!r}"
    if obj.get("error"):
        return f"error in the stream: {_error_message(data)}"
    text = chunk_text(obj)
    if text:
        texts.append(text)
    for choice in obj.get("choices") or []:
        if choice.get("finish_reason"):
            result.finish_reason = choice["finish_reason"]
    usage = obj.get("usage")
    if isinstance(usage, dict):
        if usage.get("prompt_tokens") is not None:
            result.usage_prompt_tokens = int(usage["prompt_tokens"])
        if usage.get("completion_tokens") is not None:
            result.usage_output_tokens = int(usage["completion_tokens"])
    return ""


def _error_message(body: str) -> str:
    """An OpenAI error body's message, or the body itself, shortened."""
    try:
        obj = json.loads(body)
        err = obj.get("error", obj) if isinstance(obj, dict) else obj
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:500]
        if isinstance(obj, dict) and obj.get("detail"):
            return str(obj["detail"])[:500]
    except (json.JSONDecodeError, AttributeError):
        pass
    return body.strip()[:500]


async def get_model_cards(client: httpx.AsyncClient, base_url: str,
                          headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The model cards the server lists at GET /v1/models: each with its `id` and, where the server says (vLLM,
    SGLang and moemesh do), its `root`: the folder or hub name it loaded the model from."""
    resp = await client.get(f"{base_url}/v1/models", headers=headers)
    resp.raise_for_status()
    return [m for m in resp.json().get("data", []) if isinstance(m, dict) and isinstance(m.get("id"), str)]


async def get_models(client: httpx.AsyncClient, base_url: str, headers: dict[str, str] | None = None) -> list[str]:
    """The model ids the server lists at GET /v1/models."""
    return [m["id"] for m in await get_model_cards(client, base_url, headers)]


async def wait_ready(client: httpx.AsyncClient, base_url: str, timeout_s: float,
                     headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Wait, for at most `timeout_s`, until the server can serve: GET /health answers 200 (vLLM, SGLang
    and moemesh answer 503 or nothing while loading), or 404 on a server without it; then GET /v1/models.
    Returns the model cards (`get_model_cards`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            health = await client.get(f"{base_url}/health", headers=headers)
            if health.status_code in (200, 404):
                return await get_model_cards(client, base_url, headers)
            why = f"GET /health answered {health.status_code}"
        except (httpx.HTTPError, ValueError) as e:
            why = f"{type(e).__name__}: {e}"
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{base_url} not ready within {timeout_s:g} s ({why})")
        await asyncio.sleep(0.5)
