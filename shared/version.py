"""The installed moemesh's version, as its distribution metadata says."""

from __future__ import annotations

from importlib import metadata


def package_version() -> str:
    """The `moemesh` distribution's version; 0.0.0 when running from a tree that was never installed."""
    try:
        return metadata.version("moemesh")
    except metadata.PackageNotFoundError:
        return "0.0.0"
