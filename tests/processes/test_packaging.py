"""The distribution installs one import package, `moemesh`, and its SDK runs without torch.

The wheel built from this checkout is read (nothing but `moemesh/` and its `*.dist-info/`, every package folder
of shared/ and services/ inside it), then installed into a fresh virtual environment that has only grpcio and
protobuf; an editable install into another fresh environment is checked the same way. Both import the SDK and
the stubs from a folder outside the checkout, so nothing is found by accident through the current directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import tomllib

from tests.paths import ROOT

pytestmark = pytest.mark.timeout(600)

# The SDK's import must need nothing beyond grpc and protobuf: torch is blocked outright, and the modules that
# would pull server code are listed as failures.
SDK_CHECK = """
import importlib.util, sys
sys.modules['torch'] = None
from moemesh.sdk import AsyncMeshClient, MeshClient
from moemesh.v1 import gateway_pb2, gateway_pb2_grpc
assert importlib.util.find_spec('torch') is None, 'torch is installed in this environment'
for name in ('shared', 'services'):
    assert importlib.util.find_spec(name) is None, f'a top-level {name!r} package is importable'
server = [m for m in sys.modules if m.startswith(('moemesh.engine', 'moemesh.model', 'moemesh.services'))]
assert not server, server
print(MeshClient.__module__, gateway_pb2.DESCRIPTOR.package)
"""


def _package_folders() -> set[str]:
    """Every package folder of the checkout, as its import name under `moemesh`."""
    names = set()
    for top, prefix in (("shared", "moemesh"), ("services", "moemesh.services"), ("bench", "moemesh.bench")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            if rel.parts[:1] == ("rpc",):
                names.add("moemesh.v1")  # the generated stubs, installed as their proto package
            else:
                names.add(".".join((prefix, *rel.parts)))
    return names


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert listed == _package_folders(), "pyproject.toml's [tool.setuptools] packages differ from the folders"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy: setuptools writes build/ and *.egg-info/ beside the sources it builds.
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("shared", "services", "bench"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("moemesh-*.whl")
    return built


def test_the_wheel_holds_only_the_moemesh_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"moemesh"} and len(dist_info) == 1, sorted(tops)
    packages = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert packages == _package_folders()
    assert "moemesh/v1/gateway_pb2.pyi" in names and "moemesh/services/cli/main.py" in names
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info.pop()}/entry_points.txt").decode()
    assert "moemesh = moemesh.services.cli.main:main" in entry_points


def _fresh_env(path: Path) -> Path:
    """A virtual environment with grpcio and protobuf only (at the versions pyproject.toml admits)."""
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    python = path / "bin" / "python"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = [d for d in deps if d.startswith(("grpcio>=", "protobuf>="))]
    assert len(wanted) == 2, deps
    _pip_install(python, *wanted)
    return python


def _pip_install(python: Path, *args: str) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    r = subprocess.run([str(python), "-m", "pip", "install", "-q", *args], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def _site_packages(python: Path) -> set[str]:
    code = "import sysconfig, os; print('\\n'.join(os.listdir(sysconfig.get_paths()['purelib'])))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout
    return {n for n in out.split() if n != "__pycache__"}


def _check_sdk(python: Path, cwd: Path) -> None:
    r = subprocess.run([str(python), "-c", SDK_CHECK], cwd=cwd, capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["moemesh.sdk.client", "moemesh.v1"]


def test_wheel_install_adds_only_moemesh_and_its_sdk_runs_without_torch(wheel: Path, tmp_path: Path) -> None:
    python = _fresh_env(tmp_path / "venv")
    before = _site_packages(python)
    _pip_install(python, "--no-deps", str(wheel))
    added = _site_packages(python) - before
    assert {n for n in added if not n.endswith(".dist-info")} == {"moemesh"}, sorted(added)
    assert len([n for n in added if n.endswith(".dist-info")]) == 1, sorted(added)
    _check_sdk(python, tmp_path)


def test_editable_install_imports_the_same_names(tmp_path: Path) -> None:
    python = _fresh_env(tmp_path / "venv")
    _pip_install(python, "setuptools>=68")
    _pip_install(python, "--no-deps", "--no-build-isolation", "-e", str(ROOT))
    _check_sdk(python, tmp_path)
