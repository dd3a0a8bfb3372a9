"""The native kernels' build (moemesh.kernels.native): workers starting at once into an empty cache each load a
whole library, the same file, and leave no temporary behind; a second start finds it and compiles nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moemesh.kernels import native

_BUILD = "from moemesh.kernels import native; print(native._build(native.compiler()))"
_LOAD = "from moemesh.kernels import native; print(native.library() is not None)"


@pytest.mark.skipif(native.why_not() is not None, reason=f"native kernels: {native.why_not()}")
def test_workers_starting_at_once_build_one_library(tmp_path: Path) -> None:
    env = {**__import__("os").environ, "MOEMESH_CACHE_DIR": str(tmp_path)}
    env.pop(native.ENV, None)
    workers = [subprocess.Popen([sys.executable, "-c", _BUILD], env=env, stdout=subprocess.PIPE, text=True)
               for _ in range(3)]
    paths = {w.communicate(timeout=120)[0].strip() for w in workers}
    assert all(w.returncode == 0 for w in workers)
    assert len(paths) == 1
    built = Path(paths.pop())
    assert built.parent == tmp_path / "kernels" and built.is_file()
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no temporary left behind
    mtime = built.stat().st_mtime_ns
    again = subprocess.run([sys.executable, "-c", _LOAD], env=env, capture_output=True, text=True, timeout=120)
    assert again.stdout.strip() == "True" and built.stat().st_mtime_ns == mtime  # found, not rebuilt
