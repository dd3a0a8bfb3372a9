"""The gateway's drain deadline (`drain_timeout_s`, `--drain-timeout-s`, MOEMESH_DRAIN_TIMEOUT_S): validated when
the config is built, a flag winning over the variable and the variable over the default."""

from __future__ import annotations

import argparse
import math

import pytest

from moemesh.services.gateway.config import GatewayConfig
from moemesh.services.gateway.serve import add_arguments, config_from_args


def _parse(argv: list[str]) -> GatewayConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)  # reads MOEMESH_* from the environment now
    return config_from_args(parser.parse_args(argv))


def test_default_fits_inside_kubernetes_default_termination_grace() -> None:
    assert 0 < GatewayConfig().drain_timeout_s < 30


@pytest.mark.parametrize("value", [0.0, 0.5, 120.0])
def test_any_finite_time_from_zero_is_a_drain_deadline(value: float) -> None:
    assert GatewayConfig(drain_timeout_s=value).drain_timeout_s == value


@pytest.mark.parametrize("value", [-1.0, -0.001, math.inf, math.nan])
def test_negative_infinite_or_nan_deadline_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match=r"drain_timeout_s must be a finite number >= 0, got "):
        GatewayConfig(drain_timeout_s=value)


def test_option_from_flag_environment_or_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOEMESH_DRAIN_TIMEOUT_S", raising=False)
    assert _parse([]).drain_timeout_s == GatewayConfig().drain_timeout_s
    assert _parse(["--drain-timeout-s", "7.5"]).drain_timeout_s == 7.5
    monkeypatch.setenv("MOEMESH_DRAIN_TIMEOUT_S", "12")
    assert _parse([]).drain_timeout_s == 12.0
    assert _parse(["--drain-timeout-s", "3"]).drain_timeout_s == 3.0
    with pytest.raises(ValueError, match="drain_timeout_s"):
        _parse(["--drain-timeout-s", "-2"])
