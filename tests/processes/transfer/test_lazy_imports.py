"""Every KV data plane moves rows bit-exactly with the first token, times out, cancels, and fails fast on a
dead peer. The relay runs against `RelayDouble`, a minimal stand-in for kvtransfer's relay RPCs.
L layers, N tokens, W row width."""

from __future__ import annotations

import subprocess
import sys

from tests.paths import ROOT


def test_ucx_is_imported_only_when_chosen() -> None:
    code = ("import sys; from moemesh.transfer.registry import make_receiver, make_sender; "
            "make_sender('inproc'); make_receiver('relay', target='127.0.0.1:1'); "
            "print(sorted(m for m in sys.modules if 'ucx' in m))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"


