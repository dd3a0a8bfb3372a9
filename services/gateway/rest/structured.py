"""OpenAI's `response_format` and vLLM's `structured_outputs` -> the wire's StructuredOutput.

Only the shape is checked here (a 400 naming the field); whether a schema, regex or grammar compiles is the
workers' grammar engine's call, and its refusal comes back as a 400 too.
"""

from __future__ import annotations

import json
from typing import Any

from moemesh.services.gateway.rest.errors import ApiError
from moemesh.services.gateway.rest.schemas import _Sampling
from moemesh.v1 import common_pb2

_VLLM_KEYS = ("json", "json_object", "regex", "grammar")


def structured_output(body: _Sampling) -> common_pb2.StructuredOutput | None:
    """The constraint a body asks for, or None for free text."""
    from_format = _response_format(body.response_format)
    from_vllm = _structured_outputs(body.structured_outputs)
    if from_format is not None and from_vllm is not None:
        raise ApiError(400, "give either response_format or structured_outputs, not both", "structured_outputs")
    return from_format if from_format is not None else from_vllm


def _response_format(fmt: dict[str, Any] | None) -> common_pb2.StructuredOutput | None:
    if not fmt:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return common_pb2.StructuredOutput(json_object=True)
    if kind != "json_schema":
        raise ApiError(400, f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                       "response_format.type")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise ApiError(400, "response_format.json_schema must be an object with the schema under `schema`",
                       "response_format.json_schema")
    schema = spec.get("schema", spec.get("json_schema"))  # some clients nest it under its own name
    if schema is None:
        schema = {}  # OpenAI: a missing schema means any JSON object
    return common_pb2.StructuredOutput(json_schema=_schema_text(schema, "response_format.json_schema.schema"))


def _structured_outputs(opts: dict[str, Any] | None) -> common_pb2.StructuredOutput | None:
    if not opts:
        return None
    given = [k for k in _VLLM_KEYS if opts.get(k) not in (None, False, "")]
    unknown = sorted(set(opts) - set(_VLLM_KEYS))
    if unknown or len(given) != 1:
        raise ApiError(400, f"structured_outputs must hold exactly one of {', '.join(_VLLM_KEYS)}"
                            + (f"; unknown: {', '.join(unknown)}" if unknown else ""), "structured_outputs")
    key = given[0]
    value = opts[key]
    if key == "json":
        return common_pb2.StructuredOutput(json_schema=_schema_text(value, "structured_outputs.json"))
    if key == "json_object":
        return common_pb2.StructuredOutput(json_object=True)
    if not isinstance(value, str):
        raise ApiError(400, f"structured_outputs.{key} must be a string", f"structured_outputs.{key}")
    return common_pb2.StructuredOutput(**{"regex" if key == "regex" else "grammar": value})


def _schema_text(schema: Any, where: str) -> str:
    """A schema given as an object, or as JSON text of one, as JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise ApiError(400, f"{where} is a string that is not JSON", where) from None
    if not isinstance(schema, (dict, bool)):
        raise ApiError(400, f"{where} must be a JSON Schema object", where)
    return json.dumps(schema)
