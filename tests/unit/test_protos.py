"""The generated stubs in shared/rpc/ are exactly what scripts/gen_protos.py makes from protos/."""

from __future__ import annotations

import re
from pathlib import Path

from tests.paths import ROOT, load_script


def test_stubs_match_protos(tmp_path: Path) -> None:
    out = tmp_path / "rpc"
    load_script("gen_protos", ROOT / "scripts" / "gen_protos.py").generate(out)
    committed = ROOT / "shared" / "rpc"
    fresh = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    current = {p.relative_to(committed): p.read_bytes() for p in committed.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert sorted(fresh) == sorted(current), "shared/rpc/ has missing or extra files: run scripts/gen_protos.py"
    stale = [str(k) for k in fresh if fresh[k] != current[k]]
    assert not stale, f"shared/rpc/ is stale for {stale}: run scripts/gen_protos.py"


def test_every_field_and_enum_value_is_commented_and_prefixed() -> None:
    """The contract style: every field commented; enum values prefixed with the enum's name."""
    for proto in sorted((ROOT / "protos").rglob("*.proto")):
        lines = proto.read_text().splitlines()
        enum = None
        for i, line in enumerate(lines):
            s = line.strip()
            m = re.match(r"enum (\w+) \{", s)
            if m:
                enum = re.sub(r"(?<!^)(?=[A-Z])", "_", m.group(1)).upper()
                continue
            if s == "}":
                enum = None
                continue
            field = re.match(r"(optional |repeated )?[\w.]+ \w+ = \d+;", s)
            if enum and re.match(r"\w+ = \d+;", s):
                assert s.startswith(enum + "_"), f"{proto.name}:{i + 1}: {s} lacks the {enum}_ prefix"
            elif field and not enum:
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1}: field without a comment: {s}"
