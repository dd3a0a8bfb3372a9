"""The client SDK against a real gateway on loopback (fake workers), sync and asyncio."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.paths import ROOT

pytestmark = pytest.mark.timeout(30)


def test_sdk_imports_without_torch_or_server_code() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import moemesh.sdk\n"
        "from moemesh.sdk import MeshClient, AsyncMeshClient\n"
        "bad = [m for m in sys.modules if m.startswith(('moemesh.engine', 'moemesh.model', 'moemesh.service',"
        " 'moemesh.services', 'numpy', 'tokenizers'))]\n"
        "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=30)


