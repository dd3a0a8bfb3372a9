"""Tools that some tests need and CI installs (.ci/run): elsewhere a missing one skips its tests; on CI, which
sets MOEMESH_CI=1, it fails them, so that a check CI is meant to run cannot pass by not running."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest

CI_VARIABLE = "MOEMESH_CI"


def on_ci() -> bool:
    return os.environ.get(CI_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")


def missing(what: str) -> NoReturn:
    """Skip the test for want of `what`; on CI, fail it."""
    if on_ci():
        pytest.fail(f"{what}; CI installs it ({CI_VARIABLE} is set): see .ci/run", pytrace=False)
    pytest.skip(what, allow_module_level=True)  # also from a module's import, as importorskip


def require_module(name: str) -> ModuleType:
    """`import name`, as pytest.importorskip, but failing on CI."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        missing(f"{name} is not importable: {e}")
