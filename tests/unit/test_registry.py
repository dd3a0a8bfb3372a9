"""The registry of pluggable parts (moemesh.registry), every registry built on it, the parsers that offer their
names, and the KV planes' names on the wire."""

from __future__ import annotations

import argparse
import sys

import pytest
import torch

import moemesh.transfer
from moemesh.chat.registry import REASONING_PARSERS, TOOL_PARSERS
from moemesh.ep.backends import DISPATCHERS, GEMMS
from moemesh.ep.dispatch import AllToAllDispatcher, Dispatcher
from moemesh.ep.experts import GroupedGemm, TorchGroupedGemm, make_grouped_gemm
from moemesh.kernels.backends import KERNELS
from moemesh.model.config import ModelConfig
from moemesh.model.tiny import PRESETS as TINY_PRESETS
from moemesh.model.tiny import tiny_config
from moemesh.registry import BackendUnavailable, Registry
from moemesh.services.cli.main import build_parser
from moemesh.services.decode.serve import build_parser as decode_parser
from moemesh.services.eplb.policies import POLICIES
from moemesh.services.eplb.rebalance import rebalance
from moemesh.services.eplb.serve import build_parser as eplb_parser
from moemesh.services.gateway.routers import ROUTERS
from moemesh.services.gateway.serve import add_arguments
from moemesh.services.prefill.serve import build_parser as prefill_parser
from moemesh.transfer.planes import PLANES, plane_from_proto, plane_to_proto
from moemesh.transfer.registry import make_receiver, make_sender
from moemesh.v1 import kvtransfer_pb2

# Imported at collection: the first import of torch may start helper processes, which a unit test may not.

# -- the registry itself ----------------------------------------------------------------------------------------


def test_register_refuses_a_taken_name_and_a_malformed_target() -> None:
    reg = Registry("widget")
    reg.register("a", "json:dumps")
    with pytest.raises(ValueError, match=r"widget 'a' is already registered \(as json:dumps\)"):
        reg.register("a", "json:loads")
    for bad in ("", ":dumps", "json:"):
        with pytest.raises(ValueError, match="target must be"):
            reg.register("b", bad)
    with pytest.raises(ValueError, match="non-empty name"):
        reg.register("", "json:dumps")
    assert reg.names() == ("a",)


def test_an_unknown_name_lists_the_choices() -> None:
    reg = Registry("widget")
    reg.register("small", "json:dumps")
    reg.register("large", "json:loads")
    for bad in ("huge", "", None):
        with pytest.raises(ValueError, match=r"^unknown widget .*; choose one of small, large$"):
            reg.load(bad)
    assert "small" in reg and "huge" not in reg and list(reg) == ["small", "large"] and len(reg) == 2


def test_the_module_is_imported_only_when_its_name_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    import colorsys

    monkeypatch.delitem(sys.modules, "colorsys")
    reg = Registry("colour space")
    reg.register("hsv", "colorsys:rgb_to_hsv", fast=True)
    reg.register("module", "colorsys")
    assert reg.names() == ("hsv", "module") and reg.names(fast=True) == ("hsv",) and reg.names(fast=False) == ()
    assert reg.entry("hsv").info["fast"] is True
    assert "colorsys" not in sys.modules  # registering, listing and reading data import nothing
    fn = reg.load("hsv")
    assert "colorsys" in sys.modules and fn(1.0, 0.0, 0.0) == colorsys.rgb_to_hsv(1.0, 0.0, 0.0)
    assert reg.load("module", "hls_to_rgb") is sys.modules["colorsys"].hls_to_rgb
    assert reg.load("module") is sys.modules["colorsys"]


def test_a_missing_package_names_itself_and_the_other_choices() -> None:
    reg = Registry("widget")
    reg.register("plain", "json:dumps")
    reg.register("fancy", "moemesh_test_no_such_package.fancy:Widget")
    with pytest.raises(BackendUnavailable, match=r"widget 'fancy' cannot be used: importing "
                                                 r"moemesh_test_no_such_package\.fancy failed .*\(plain\)"):
        reg.load("fancy")


# -- every kind of part -----------------------------------------------------------------------------------------


def test_the_registered_parts() -> None:
    # At least these (a new backend is one more registration line, and needs no edit here).
    for registry, names in ((PLANES, ("ucx", "relay", "inproc")), (DISPATCHERS, ("all_to_all", "deepep")),
                            (GEMMS, ("torch", "deepgemm")), (POLICIES, ("auto", "hierarchical", "global")),
                            (ROUTERS, ("prefix_affinity", "least_load", "round_robin")),
                            (KERNELS, ("onednn", "torch")), (TOOL_PARSERS, ("deepseek_v3", "deepseek_v31")),
                            (REASONING_PARSERS, ("deepseek_r1",))):
        assert registry.names()[:len(names)] == names, registry
    crossing = PLANES.names(cross_process=True)
    assert {"ucx", "relay"} <= set(crossing) and "inproc" not in crossing
    # Every plane states whether it can join two processes (`moemesh up` offers only those that can).
    assert all(isinstance(PLANES.entry(p).info["cross_process"], bool) for p in PLANES)


def test_choosing_relay_or_inproc_does_not_import_ucx(monkeypatch: pytest.MonkeyPatch) -> None:
    # Fresh imports of every plane's module for this test (restored after), so none is already loaded.
    for plane in PLANES:
        monkeypatch.delitem(sys.modules, f"moemesh.transfer.{plane}", raising=False)
        monkeypatch.delattr(moemesh.transfer, plane, raising=False)
    make_receiver("relay", target="127.0.0.1:1")
    make_sender("inproc")
    assert "moemesh.transfer.relay" in sys.modules and "moemesh.transfer.ucx" not in sys.modules


def test_ep_backends_load_their_classes() -> None:
    assert DISPATCHERS.load("all_to_all") is AllToAllDispatcher
    assert isinstance(make_grouped_gemm("torch"), TorchGroupedGemm)
    with pytest.raises(ValueError, match="unknown grouped GEMM 'cutlass'; choose one of torch, deepgemm"):
        make_grouped_gemm("cutlass")
    # The GPU backends' modules import without their packages (those are checked when a backend is built).
    assert issubclass(DISPATCHERS.load("deepep"), Dispatcher) and issubclass(GEMMS.load("deepgemm"), GroupedGemm)


def test_eplb_policies_place_as_named() -> None:
    weight = torch.arange(1, 1 + 2 * 12, dtype=torch.float64).view(2, 12) % 7 + 1  # [L=2, E=12]
    even, uneven = (16, 4, 2, 8), (16, 3, 2, 8)  # P, G, N, R: 4 groups divide over 2 nodes, 3 do not
    place = {name: POLICIES.load(name) for name in POLICIES}
    assert torch.equal(place["auto"](weight, *even), place["hierarchical"](weight, *even))
    assert torch.equal(place["auto"](weight, *uneven), place["global"](weight, *uneven))
    assert not torch.equal(place["hierarchical"](weight, *even), place["global"](weight, *even))
    for name in POLICIES:  # rebalance places with the named policy (and its own checks on top)
        assert torch.equal(rebalance(weight, *even, policy=name).phy2log, place[name](weight, *even))


# -- the parsers offer exactly the registered names -------------------------------------------------------------


def _choices(parser: argparse.ArgumentParser, *path: str) -> tuple[str, ...]:
    """The choices of option path[-1] of the (sub)parser reached through the subcommands path[:-1]."""
    *subs, option = path
    for sub in subs:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[sub]
    action = next(a for a in parser._actions if option in a.option_strings)
    return tuple(action.choices)


def test_every_parser_offers_the_registered_names() -> None:
    cli = build_parser()
    gateway = argparse.ArgumentParser()
    add_arguments(gateway)
    for worker in (decode_parser(), prefill_parser()):
        assert _choices(worker, "--transfer") == PLANES.names()
        assert _choices(worker, "--ep-dispatcher") == DISPATCHERS.names()
        assert _choices(worker, "--ep-gemm") == GEMMS.names()
    # `up` runs every service in its own process: a plane that cannot cross one is not offered.
    assert _choices(cli, "up", "--transfer") == PLANES.names(cross_process=True)
    assert "inproc" in PLANES and "inproc" not in _choices(cli, "up", "--transfer")
    assert _choices(cli, "up", "--router") == ROUTERS.names() == _choices(gateway, "--router")
    assert _choices(eplb_parser(), "--policy") == POLICIES.names()
    assert _choices(cli, "eplb", "rebalance", "--policy") == POLICIES.names()
    assert _choices(cli, "eplb", "simulate", "--policy") == POLICIES.names()
    assert _choices(cli, "make-tiny", "--preset") == tuple(TINY_PRESETS)
    for preset in TINY_PRESETS:  # every preset is a valid config
        ModelConfig.from_hf_dict(tiny_config(preset))


# -- the KV planes on the wire ----------------------------------------------------------------------------------


def test_plane_names_and_enum_values_round_trip() -> None:
    enum_values = [v for v in kvtransfer_pb2.DataPlane.values() if v != kvtransfer_pb2.DATA_PLANE_UNSPECIFIED]
    for plane in PLANES:
        assert plane_from_proto(plane_to_proto(plane), plane) == plane  # what this version sends
        assert plane_from_proto(0, plane) == plane
    # Every value the enum lists is a registered plane, named after it: older peers send only these.
    assert sorted(plane_from_proto(v) for v in enum_values) == sorted(
        kvtransfer_pb2.DataPlane.Name(v).removeprefix("DATA_PLANE_").lower() for v in enum_values)
    assert {plane_to_proto(plane_from_proto(v)) for v in enum_values} == set(enum_values)
    assert plane_to_proto("relay") == kvtransfer_pb2.DATA_PLANE_RELAY
    assert plane_to_proto("ucx") == kvtransfer_pb2.DATA_PLANE_UCX


def test_plane_refusals() -> None:
    with pytest.raises(ValueError, match="no KV data plane for DataPlane value DATA_PLANE_UNSPECIFIED"):
        plane_from_proto(kvtransfer_pb2.DATA_PLANE_UNSPECIFIED)
    with pytest.raises(ValueError, match="no KV data plane for DataPlane value 99"):
        plane_from_proto(99)
    with pytest.raises(ValueError, match="unknown KV data plane 'rdma'"):
        plane_from_proto(kvtransfer_pb2.DATA_PLANE_RELAY, "rdma")
    with pytest.raises(ValueError, match="DATA_PLANE_UCX and data_plane_name 'relay' name different planes"):
        plane_from_proto(kvtransfer_pb2.DATA_PLANE_UCX, "relay")
    with pytest.raises(ValueError, match="unknown KV data plane 'rdma'"):
        plane_to_proto("rdma")


def test_a_plane_the_enum_does_not_list_travels_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PLANES, "_entries", dict(PLANES._entries))  # the registration below is undone after
    PLANES.register("shm", "moemesh.transfer.shm", receiver="ShmReceiver", sender="ShmSender", cross_process=True)
    assert plane_to_proto("shm") == kvtransfer_pb2.DATA_PLANE_UNSPECIFIED
    assert plane_from_proto(plane_to_proto("shm"), "shm") == "shm"
    with pytest.raises(ValueError):
        plane_from_proto(kvtransfer_pb2.DATA_PLANE_RELAY, "shm")
