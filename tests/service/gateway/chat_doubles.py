"""A decode worker double that streams a scripted answer, for the chat output tests (tool calls, reasoning).

A tiny random model never calls a tool on its own, so the engine boundary is where the test takes over:
`ScriptedDecode` answers every request with the token ids of a given text (DeepSeek's markers are single
tokens of the chat tokenizer), `chunk` ids per message, as a decode worker streams them; it ends with EOS,
or with a stop string of the request found in the text (cut from its text, as the engine does). The
gateway, its core, its parsers, REST and the SDK all run for real on loopback.

This module holds no tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc

from moemesh.chat import tokens as chat
from moemesh.model.tiny_tokenizer import build_tiny_tokenizer
from moemesh.model.tokenizer import Tokenizer
from moemesh.v1 import common_pb2, decode_pb2
from tests.service.gateway.doubles import VOCAB, FakeDecode

EOS_ID = 1  # the tiny tokenizer's


def make_chat_tokenizer_dir(path: Path) -> Path:
    """A tokenizer-only model folder whose vocabulary has DeepSeek's chat tokens (and the tiny template)."""
    path.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(path, vocab_size=VOCAB, chat_tokens=True)
    return path


def v3_call(name: str, arguments: dict[str, Any]) -> str:
    """One call in DeepSeek-V3's format (without the calls block around it)."""
    return (f"{chat.TOOL_CALL_BEGIN}function{chat.TOOL_SEP}{name}\n```json\n{json.dumps(arguments)}\n```"
            f"{chat.TOOL_CALL_END}")


def v3_calls(*calls: str) -> str:
    return chat.TOOL_CALLS_BEGIN + "\n".join(calls) + chat.TOOL_CALLS_END


class ScriptedDecode(FakeDecode):
    """Answers each request with the token ids of `text`, `chunk` ids per message."""

    def __init__(self, tokenizer: Tokenizer, text: str, chunk: int = 3) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.ids = tokenizer.encode(text, add_special_tokens=False) + [EOS_ID]
        self.chunk = chunk

    async def Generate(self, request: decode_pb2.DecodeRequest, context: grpc.aio.ServicerContext) -> Any:
        self.requests.append(request)
        self.started.set()
        prompt = list(request.prompt_token_ids)
        limit = request.sampling.max_tokens
        stops = list(request.sampling.stop)
        sent_text = ""
        for start in range(0, min(len(self.ids), limit), self.chunk):
            ids = self.ids[start:min(start + self.chunk, limit)]
            done = self.ids[:start + len(ids)]
            text = self.tokenizer.decode(done)
            resp = decode_pb2.DecodeResponse(token_ids=ids, num_prompt_tokens=len(prompt))
            hit = next(((text.find(s), s) for s in stops if s in text), None)
            if hit is not None:
                at, stop = hit
                keep = text[:at + len(stop)] if request.sampling.include_stop_str_in_output else text[:at]
                resp.text = keep[len(sent_text):]
                resp.finish_reason = common_pb2.FINISH_REASON_STOP
                resp.stop_string = stop
                yield resp
                return
            resp.text = text[len(sent_text):]
            sent_text = text
            if done[-1] == EOS_ID:
                resp.finish_reason = common_pb2.FINISH_REASON_STOP
                resp.stop_token_id = EOS_ID
            elif start + len(ids) >= limit:
                resp.finish_reason = common_pb2.FINISH_REASON_LENGTH
            yield resp
            if resp.finish_reason:
                return
