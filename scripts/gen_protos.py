"""Regenerate the Python stubs in shared/rpc/ from protos/ (the only way they are made).

    python scripts/gen_protos.py            # rewrite shared/rpc/
    python scripts/gen_protos.py --out DIR  # write elsewhere (the drift test compares the two)

The stubs land in shared/rpc/moemesh/v1/, installed as the import package `moemesh.v1` (the proto package's
own name), so protoc's `from moemesh.v1 import x_pb2` lines work as written and the files are its output
verbatim, plus a docstring package marker.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
DEFAULT_OUT = ROOT / "shared" / "rpc"
_HEADER = '"""Generated from protos/ by scripts/gen_protos.py; do not edit."""\n'


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    protos = sorted(PROTOS.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTOS}", f"-I{_well_known_protos()}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *map(str, protos)]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        written = []
        for f in sorted(Path(tmp).rglob("*")):
            if f.is_dir():
                continue
            dst = out / f.relative_to(tmp)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(f.read_text())
            written.append(dst)
    # Only the proto package is a Python package: shared/rpc/ and shared/rpc/moemesh/ are just folders,
    # so that nothing installs a second `moemesh` package inside the first.
    (out / "moemesh" / "v1" / "__init__.py").write_text(_HEADER)
    return written


def _well_known_protos() -> str:
    import grpc_tools

    return str(Path(grpc_tools.__file__).parent / "_proto")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    files = generate(args.out)
    print(f"wrote {len(files)} files to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
