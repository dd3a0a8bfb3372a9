"""Between protobuf messages and the engine's own types (sampling params, finish reasons, logprobs)."""

from __future__ import annotations

from collections.abc import Sequence

from moemesh.engine.request import FinishReason
from moemesh.engine.sampling_params import SamplingParams, StructuredOutput
from moemesh.v1 import common_pb2

_FINISH_TO_PB = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
}


def sampling_from_pb(pb: common_pb2.SamplingParams) -> SamplingParams:
    """Proto -> validated SamplingParams (raises InvalidParameter with the field's name)."""
    return SamplingParams(
        max_tokens=pb.max_tokens or 16,
        temperature=pb.temperature if pb.HasField("temperature") else 1.0,
        top_p=pb.top_p if pb.HasField("top_p") else 1.0,
        top_k=pb.top_k if pb.top_k > 0 else -1,
        min_p=pb.min_p,
        frequency_penalty=pb.frequency_penalty,
        presence_penalty=pb.presence_penalty,
        repetition_penalty=pb.repetition_penalty if pb.HasField("repetition_penalty") else 1.0,
        seed=pb.seed if pb.HasField("seed") else None,
        stop=tuple(pb.stop),
        stop_token_ids=tuple(pb.stop_token_ids),
        ignore_eos=pb.ignore_eos,
        min_tokens=pb.min_tokens,
        logprobs=pb.logprobs if pb.HasField("logprobs") else None,
        include_stop_str_in_output=pb.include_stop_str_in_output,
        structured_output=structured_from_pb(pb.structured_output) if pb.HasField("structured_output") else None,
        logit_bias=tuple(pb.logit_bias.items()),
        skip_special_tokens=pb.skip_special_tokens if pb.HasField("skip_special_tokens") else True,
        prompt_logprobs=pb.prompt_logprobs if pb.HasField("prompt_logprobs") else None,
    )


def structured_from_pb(pb: common_pb2.StructuredOutput) -> StructuredOutput | None:
    """The oneof's case as the engine's spec; None when no case is set (an empty message constrains nothing)."""
    kind = pb.WhichOneof("kind")
    if kind is None:
        return None
    return StructuredOutput(kind, "" if kind == "json_object" else getattr(pb, kind))


def structured_to_pb(s: StructuredOutput) -> common_pb2.StructuredOutput:
    if s.kind == "json_object":
        return common_pb2.StructuredOutput(json_object=True)
    return common_pb2.StructuredOutput(**{s.kind: s.spec})


def sampling_to_pb(p: SamplingParams) -> common_pb2.SamplingParams:
    pb = common_pb2.SamplingParams(
        max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=max(p.top_k, 0), min_p=p.min_p,
        frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty,
        repetition_penalty=p.repetition_penalty, stop=list(p.stop), stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos, min_tokens=p.min_tokens, include_stop_str_in_output=p.include_stop_str_in_output)
    if p.seed is not None:
        pb.seed = p.seed
    if p.logprobs is not None:
        pb.logprobs = p.logprobs
    if p.structured_output is not None:
        pb.structured_output.CopyFrom(structured_to_pb(p.structured_output))
    for token, bias in p.logit_bias:
        pb.logit_bias[token] = bias
    if not p.skip_special_tokens:
        pb.skip_special_tokens = False
    if p.prompt_logprobs is not None:
        pb.prompt_logprobs = p.prompt_logprobs
    return pb


def finish_to_pb(reason: FinishReason | None) -> int:
    return _FINISH_TO_PB.get(reason, common_pb2.FINISH_REASON_UNSPECIFIED) if reason else 0


def prompt_logprobs_to_pb(entries: Sequence[tuple[float, Sequence[tuple[int, float]]] | None] | None
                          ) -> list[common_pb2.StepLogprobs]:
    """A request's prompt logprobs (the engine's per-position list, [0] None) as the wire's entries for the prompt
    tokens after the first."""
    if not entries:
        return []
    done = [e for e in entries[1:] if e is not None]
    return logprobs_to_pb([lp for lp, _ in done], [top for _, top in done])


def logprobs_to_pb(logprobs: Sequence[float], tops: Sequence[Sequence[tuple[int, float]]]
                   ) -> list[common_pb2.StepLogprobs]:
    """One StepLogprobs per token; `tops` may be shorter (no top-N asked for)."""
    out = []
    for i, lp in enumerate(logprobs):
        top = tops[i] if i < len(tops) else ()
        out.append(common_pb2.StepLogprobs(
            logprob=lp, top=[common_pb2.TokenLogprob(token_id=t, logprob=v) for t, v in top]))
    return out
