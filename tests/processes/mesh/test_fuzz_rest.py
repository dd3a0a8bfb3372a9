"""Fuzzing the REST facade from its own OpenAPI document (schemathesis) against a real mesh on loopback.

`moemesh up --prefill 0 --decode 1` (colocated: one decode worker prefills itself) with a 64-token context,
so that no generated request, however large its max_tokens or n, keeps the worker busy for long. Every
operation of the gateway's /openapi.json gets schema-valid and schema-invalid requests; each must be
answered within REQUEST_TIMEOUT_S with:

- no 5xx (`not_a_server_error`; a 503/504 here would mean the mesh fell over or hung on a request);
- a documented status code, content type, headers and body (`status_code_conformance`,
  `content_type_conformance`, `response_headers_conformance`, `response_schema_conformance`);
- invalid input refused with a 4xx (`negative_data_rejection`).

`positive_data_acceptance` (every schema-valid body is accepted) is not checked: some refusals depend on
the served model and cannot be written in a static schema (a token id past the vocabulary, a prompt longer
than the context, echo with logprobs, best_of != n); they are 400s with a message, as documented.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis import checks

from tests.processes.mesh.launch import RunningMesh, start_mesh

pytestmark = pytest.mark.timeout(300)

CONTEXT_TOKENS = 64
REQUEST_TIMEOUT_S = 30.0  # far above any answer here (tokens are capped by the context): past it, a hang
MAX_EXAMPLES = 25  # per operation and generation mode
# (operation, positive/negative, status) -> calls, reported by the last test.
SEEN: Counter[tuple[str, str, int]] = Counter()


@pytest.fixture(scope="module")
def mesh() -> Iterator[RunningMesh]:
    running = start_mesh("--prefill", "0", "--decode", "1", env={
        "MOEMESH_MAX_MODEL_LEN": str(CONTEXT_TOKENS),  # the gateway's limit and the worker's
    })
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def rest_api(mesh: RunningMesh) -> Any:
    return schemathesis.openapi.from_url(f"http://{mesh.services['gateway-http'][0]}/openapi.json", timeout=10)


schema = schemathesis.pytest.from_fixture("rest_api")


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.trust_env = False  # loopback: no proxy from the environment
        yield s


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
def test_rest_api_from_its_openapi_document(case: Any, session: requests.Session, mesh: RunningMesh) -> None:
    t0 = time.monotonic()
    response = case.call_and_validate(session=session, timeout=REQUEST_TIMEOUT_S,
                                      excluded_checks=[checks.positive_data_acceptance])
    elapsed = time.monotonic() - t0
    mode = case.meta.generation.mode.value if case.meta is not None else "explicit"
    SEEN[(case.operation.label, mode, response.status_code)] += 1
    assert response.status_code < 500, response.text[:500]
    assert elapsed < REQUEST_TIMEOUT_S
    assert mesh.proc.poll() is None, "the mesh exited"


def test_the_mesh_still_serves_afterwards(mesh: RunningMesh, session: requests.Session) -> None:
    print(f"\n{sum(SEEN.values())} REST calls: " + ", ".join(f"{op} {mode} {status}: {n}"
                                                        for (op, mode, status), n in sorted(SEEN.items())))
    base = f"http://{mesh.services['gateway-http'][0]}"
    health = session.get(f"{base}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    out = session.post(f"{base}/v1/completions", json={"prompt": "The mesh is", "max_tokens": 4, "temperature": 0,
                                                       "ignore_eos": True}, timeout=60)
    assert out.status_code == 200, out.text
    assert out.json()["usage"]["completion_tokens"] == 4
    assert sorted(mesh.alive_pids()) == sorted(pid for _, pid in mesh.services.values())


@pytest.mark.parametrize(("body", "status", "words"), [
    # Positive values too small for the wire's float32 stay positive (they used to arrive as an invalid 0).
    ({"top_p": 5e-324, "repetition_penalty": 5e-324, "temperature": 5e-324}, 200, ""),
    # Larger than float32 holds: refused by the schema, not turned into infinity.
    ({"temperature": 1e300}, 400, "temperature: Input should be less than or equal to 3402823466385288"),
    ({"prompt": ""}, 400, "prompt: Value error, must be a non-empty text"),
    ({"prompt": [[1, 2], []]}, 400, "prompt: Value error, must be a non-empty text"),
    ({"stop": [""]}, 400, "stop"),
    ({"stop": ["x"] * 129}, 400, "stop"),
    ({"model": "m" * 100_000}, 404, "characters) is not served here"),
])
def test_edge_values(mesh: RunningMesh, session: requests.Session, body: dict[str, Any], status: int,
                     words: str) -> None:
    base = f"http://{mesh.services['gateway-http'][0]}"
    r = session.post(f"{base}/v1/completions", json={"prompt": "The mesh is", "max_tokens": 2, **body}, timeout=30)
    assert r.status_code == status, r.text[:500]
    if status != 200:
        assert words in r.json()["error"]["message"] and len(r.text) < 2048, r.text[:500]
