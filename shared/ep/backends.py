"""The EP backends by name: dispatch/combine and grouped expert GEMMs, one registration line each.

Imports no torch and no backend, so parsers take their `--ep-dispatcher` / `--ep-gemm` choices from here;
`moemesh.ep.dispatch.make_dispatcher` and `moemesh.ep.experts.make_grouped_gemm` build them. GPU packages
(deep_ep, deep_gemm) stay optional: a backend checks for its package when it is built, at start-up.
"""

from __future__ import annotations

from moemesh.registry import Registry

# Dispatcher classes take (group, placement, **options) and subclass moemesh.ep.dispatch.Dispatcher.
DISPATCHERS = Registry("dispatcher")
DISPATCHERS.register("all_to_all", "moemesh.ep.dispatch:AllToAllDispatcher")
DISPATCHERS.register("deepep", "moemesh.ep.deepep:DeepEPDispatcher")

# Grouped GEMM classes take no arguments and subclass moemesh.ep.experts.GroupedGemm.
GEMMS = Registry("grouped GEMM")
GEMMS.register("torch", "moemesh.ep.experts:TorchGroupedGemm")
GEMMS.register("deepgemm", "moemesh.ep.deepgemm:DeepGemmGroupedGemm")
GEMMS.register("onednn", "moemesh.ep.onednn_gemm:OneDnnGroupedGemm")  # bf16 on a CPU: weights prepacked once
GEMMS.register("grouped_mm", "moemesh.ep.grouped_mm:TorchGroupedMmGemm")  # torch._grouped_mm: bf16, sm90/100, no build
