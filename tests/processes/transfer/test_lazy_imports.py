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




def test_help_and_every_registry_import_no_torch_and_no_backend() -> None:
    # torch unimportable: `moemesh --help` and the registries (what parsers take their choices from) must not
    # need it; listing names must import none of the registered modules.
    code = ("import sys; sys.modules['torch'] = None\n"
            "from moemesh.services.cli.main import build_parser\n"
            "from moemesh.ep.backends import DISPATCHERS, GEMMS\n"
            "from moemesh.services.eplb.policies import POLICIES\n"
            "from moemesh.services.gateway.routers import ROUTERS\n"
            "from moemesh.transfer.planes import PLANES\n"
            "from moemesh.kernels.backends import KERNELS\n"
            "build_parser().format_help()\n"
            "regs = (DISPATCHERS, GEMMS, POLICIES, ROUTERS, PLANES, KERNELS)\n"
            "print(sorted({r.entry(n).module for r in regs for n in r.names()} & set(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
