"""The data plane's fault hook (`MOEMESH_FAULT_KV`, shared/transfer/faults.py) on real planes.

inproc, relay through a real kvtransfer service on loopback (rooms opened as the workers open them), and
UCX where ucxx is installed. With the hook set: a corrupt chunk is refused by its checksum and fails the
room with a clear error, never writing wrong rows; dropped chunks end the room cleanly within its lease;
a delay only slows. Unset: senders carry no injector and rows move bit-exactly. A malformed variable
fails a worker's start-up. L layers, N tokens, W row width.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moemesh.transfer.faults import ENV
from tests.paths import ROOT

pytestmark = pytest.mark.timeout(60)


# -- the variable ---------------------------------------------------------------------------------


def test_a_malformed_variable_fails_the_worker_at_start_up() -> None:
    # A prefill worker makes its sender only on its first transfer; the variable must fail it long before.
    env = {**os.environ, ENV: "drop=0.1,corupt=0.5"}
    proc = subprocess.run(
        [sys.executable, "-m", "moemesh.services.cli.main", "serve", "prefill", "--port", "0", "--metrics-port", "-1",
         "--gateway", "", "--eplb", "", "--model", "/nonexistent-model-dir"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert f"{ENV}='drop=0.1,corupt=0.5': unknown key 'corupt'" in proc.stderr
    assert "nonexistent-model-dir" not in proc.stderr  # it failed before loading anything


# -- faults on every plane ------------------------------------------------------------------------


