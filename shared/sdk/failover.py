"""Several gateways behind one client: which one a call goes to, and how a stream that broke goes on at another.

Gateways are stateless replicas: any of them can serve any request. A client is given several (a list, a
comma-separated string, or one `dns:///` name that resolves to several, which gRPC balances round robin over its
addresses); each call starts at the next one in turn. A call that fails UNAVAILABLE before any token arrived is
retried at the next gateway (`RetryPolicy`). A stream that breaks UNAVAILABLE after some tokens (its gateway died)
is re-issued at the next gateway with the tokens it has (`GenerateRequest.resume_token_ids` and the last
`text_offset`): the workers re-prefill prompt and tokens and go on, so greedy and seeded outputs continue token
for token, nothing repeated and nothing missing; at most `max_resumes` times per call. With one gateway there is
nowhere else to go: its failure after tokens is the call's error, as before (the gateway itself already moved the
request between workers).
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from moemesh.sdk.errors import MeshError, UnavailableError, from_rpc_error
from moemesh.sdk.retry import Deadline, RetryPolicy
from moemesh.v1 import gateway_pb2

DEFAULT_MAX_RESUMES = 2


def parse_targets(target: str | Sequence[str]) -> list[str]:
    """Gateway addresses: a list, or a comma-separated string ('h1:50051,h2:50051'); a `dns:///` name stays one."""
    targets = [t.strip() for t in (target.split(",") if isinstance(target, str) else target)]
    targets = [t for t in targets if t]
    if not targets:
        raise ValueError("no gateway address given")
    return targets


class Rotation:
    """The next gateway in turn, for the next call and for each retry or resume of a call."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._next = 0

    def take(self) -> int:
        i = self._next
        self._next = (i + 1) % self.count
        return i


class StreamFailover:
    """One Generate call's tries: where each goes, what it sends, and whether a failure ends the call.

    The client's loop asks `request()` and `target` for each try, passes every response to `observe`, and on an
    RpcError asks `after(err)`: seconds to wait before the next try, or the MeshError to raise.
    """

    def __init__(self, req: gateway_pb2.GenerateRequest, targets: Sequence[str], rotation: Rotation,
                 policy: RetryPolicy, deadline: Deadline, max_resumes: int = DEFAULT_MAX_RESUMES) -> None:
        self._req = req
        self._targets = targets
        self._rotation = rotation
        self._policy = policy
        self.deadline = deadline
        self.max_resumes = max_resumes
        self.target = rotation.take()
        self.token_ids: list[int] = []
        self.text_offset = 0
        self.request_id = req.request_id
        self.retries = 0
        self.resumes = 0
        self._elsewhere = len(targets) > 1 or targets[0].startswith("dns:")  # another gateway to resume at
        self._failed: list[str] = []

    def request(self) -> gateway_pb2.GenerateRequest:
        """This try's request: the caller's, continuing after the tokens already received, under the same id."""
        if not self.token_ids:
            return self._req
        req = gateway_pb2.GenerateRequest()
        req.CopyFrom(self._req)
        req.request_id = self.request_id
        req.resume_token_ids[:] = self.token_ids
        req.resume_text_offset = self.text_offset
        return req

    def observe(self, resp: gateway_pb2.GenerateResponse) -> None:
        self.token_ids.extend(resp.token_ids)
        self.text_offset = resp.text_offset
        self.request_id = self.request_id or resp.request_id

    def after(self, err: grpc.RpcError) -> float | MeshError:
        """Seconds before the next try (at the next gateway), or the error that ends the call."""
        code = err.code() if hasattr(err, "code") else None
        self._failed.append(self._targets[self.target])
        if self.token_ids:
            left = self.deadline.remaining_s()
            if code != grpc.StatusCode.UNAVAILABLE or not self._elsewhere or (left is not None and left <= 0):
                return from_rpc_error(err)
            if self.resumes >= self.max_resumes:
                return self._exhausted(err, f"the stream broke {self.resumes + 1} times (max_resumes "
                                            f"{self.max_resumes})")
            self.resumes += 1
            self.target = self._rotation.take()
            return 0.0
        delay = self._policy.delay_s(code, self.retries, False, self.deadline)
        if delay is None:
            if code == grpc.StatusCode.UNAVAILABLE and len(self._targets) > 1:
                return self._exhausted(err, f"no gateway answered in {self.retries + 1} tries")
            return from_rpc_error(err)
        self.retries += 1
        self.target = self._rotation.take()
        return delay

    def _exhausted(self, err: grpc.RpcError, why: str) -> UnavailableError:
        details = err.details() if hasattr(err, "details") else str(err)
        tried = ", ".join(dict.fromkeys(self._failed))
        return UnavailableError(grpc.StatusCode.UNAVAILABLE,
                                f"{why}; gateways tried: {tried}; last error: {details}")
