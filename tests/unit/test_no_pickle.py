"""Nothing the mesh ships unpickles anything: an AST scan of every .py it ships (not tests/).

The design's invariant: protobuf on the control plane, raw bytes with a described layout on the data
plane, never pickle, whose loads run arbitrary code sent by whoever reaches the socket or wrote the
file. Flagged (with file:line):
- importing pickle, cPickle, _pickle, cloudpickle, dill, jsonpickle, shelve, joblib, or marshal's loads;
- `torch.load(...)` without `weights_only=True`; `numpy.load(..., allow_pickle=<anything but False>)`;
  `pandas.read_pickle`; `yaml.load` without a safe loader, `yaml.unsafe_load`;
- objects over process boundaries: multiprocessing (or torch.multiprocessing) queues, pipes, managers
  and `multiprocessing.connection` (pickle over pipes and sockets), torch.distributed's `*_object*`
  collectives (pickle over the process group's sockets).
Names are resolved through imports (`import numpy as np`, `from torch import load`), not grepped.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.paths import ROOT

SHIPPED = ("shared", "services", "scripts", "bench", "deploy")

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "jsonpickle", "shelve", "joblib",
                  "multiprocessing.connection", "multiprocessing.managers", "multiprocessing.reduction"}
# Calls flagged whatever their arguments (fully qualified, after resolving imports).
PICKLE_CALLS = {
    "marshal.load", "marshal.loads", "pandas.read_pickle", "yaml.unsafe_load", "yaml.full_load",
    "numpy.loads",  # an alias of pickle.loads in old numpy
    *(f"{mp}.{name}" for mp in ("multiprocessing", "torch.multiprocessing")
      for name in ("Queue", "SimpleQueue", "JoinableQueue", "Pipe", "Manager")),
    *(f"multiprocessing.{ctx}.{name}" for ctx in ("context", "queues") for name in ("Queue", "SimpleQueue")),
    *(f"torch.distributed.{name}" for name in ("broadcast_object_list", "all_gather_object", "gather_object",
                                               "scatter_object_list", "send_object_list", "recv_object_list")),
}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def shipped_files() -> list[Path]:
    return sorted(p for top in SHIPPED if (ROOT / top).is_dir() for p in (ROOT / top).rglob("*.py"))


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted name it stands for, from every import in the module (any scope)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                # `import a.b` binds `a`; `import a.b as c` binds `c` to a.b.
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """`np.load` -> "numpy.load" (through the aliases); None for anything but names and attributes."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _module_hits(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in PICKLE_MODULES)


def findings(source: str, filename: str = "<string>") -> Iterator[tuple[int, str]]:
    """(line, what) for every use of pickle in `source`."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _module_hits(a.name):
                    yield node.lineno, f"imports {a.name}"
        elif isinstance(node, ast.ImportFrom) and node.module:
            if _module_hits(node.module):
                yield node.lineno, f"imports from {node.module}"
            elif node.module == "marshal" and any(a.name in ("load", "loads") for a in node.names):
                yield node.lineno, "imports marshal's loads"
        elif isinstance(node, ast.Call):
            name = _dotted(node.func, aliases)
            if name is None:
                continue
            if name in PICKLE_CALLS:
                yield node.lineno, f"calls {name} (pickle)"
            elif name in ("torch.load", "torch.serialization.load") and not _is_const(
                    _keyword(node, "weights_only"), True):
                yield node.lineno, f"calls {name} without weights_only=True"
            elif name in ("numpy.load", "numpy.lib.npyio.load"):
                allow = _keyword(node, "allow_pickle")
                if allow is not None and not _is_const(allow, False):
                    yield node.lineno, f"calls {name} with allow_pickle"
            elif name == "yaml.load":
                loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                loader_name = _dotted(loader, aliases) if loader is not None else None
                if loader_name is None or loader_name.rsplit(".", 1)[-1] not in SAFE_YAML_LOADERS:
                    yield node.lineno, "calls yaml.load without a safe Loader"
            elif name in ("importlib.import_module", "__import__") and node.args:
                target = node.args[0]
                if isinstance(target, ast.Constant) and isinstance(target.value, str) and _module_hits(target.value):
                    yield node.lineno, f"imports {target.value} dynamically"


def test_shipped_code_never_unpickles() -> None:
    files = shipped_files()
    assert len(files) > 50, "the scan found too few files: wrong root?"
    problems = [f"{path.relative_to(ROOT)}:{line}: {what}"
                for path in files for line, what in findings(path.read_text(encoding="utf-8"), str(path))]
    assert not problems, "pickle in shipped code (see tests/unit/test_no_pickle.py):\n" + "\n".join(problems)


@pytest.mark.parametrize("source", [
    "import pickle",
    "import cPickle as p",
    "import dill",
    "from shelve import open",
    "import multiprocessing.connection",
    "from multiprocessing.connection import Listener",
    "from multiprocessing.managers import BaseManager",
    "import marshal\nmarshal.loads(b'')",
    "from marshal import loads",
    "import torch\ntorch.load('w.pt')",
    "import torch as T\nT.load('w.pt', weights_only=False)",
    "from torch import load\nload('w.pt', map_location='cpu')",
    "import torch\ntorch.load('w.pt', weights_only=flag)",
    "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
    "from numpy import load\nload('x.npy', allow_pickle=ok)",
    "import multiprocessing as mp\nq = mp.Queue()",
    "from multiprocessing import Pipe\nPipe()",
    "import torch.multiprocessing as tmp\ntmp.SimpleQueue()",
    "import torch.distributed as dist\ndist.broadcast_object_list([x])",
    "from torch import distributed\ndistributed.all_gather_object(out, x)",
    "import yaml\nyaml.load(s)",
    "import yaml\nyaml.load(s, Loader=yaml.Loader)",
    "import pandas as pd\npd.read_pickle('f')",
    "import importlib\nimportlib.import_module('pickle')",
    "def f():\n    import pickle\n    return pickle.loads(b'')",
])
def test_scanner_flags(source: str) -> None:
    assert list(findings(source)), source


@pytest.mark.parametrize("source", [
    "import torch\ntorch.load('w.pt', weights_only=True)",
    "import numpy as np\nnp.load('x.npy')\nnp.load('x.npy', allow_pickle=False)",
    "import yaml\nyaml.safe_load(s)\nyaml.load(s, Loader=yaml.SafeLoader)",
    "import json\njson.loads(s)",
    "from safetensors.torch import load_file\nload_file('w.safetensors')",
    "import multiprocessing as mp\nmp.cpu_count()",
    "import torch.distributed as dist\ndist.all_reduce(t)",
    "model.load('pickle')",  # an unrelated object's method
    "# import pickle\ns = 'import pickle'",
])
def test_scanner_passes(source: str) -> None:
    assert not list(findings(source)), source
