"""`moemesh --version` says the installed version."""

from __future__ import annotations

import pytest

from moemesh.services.cli.main import main
from moemesh.version import package_version


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"moemesh {package_version()}"
    assert package_version() != "0.0.0"  # installed (editable or not): the distribution's own metadata
