"""The EPLB placement policies by name, one registration line each. Imports no torch, so parsers take their
`--policy` choices from here. DEFAULT is the one every entry uses unless told otherwise.

A policy is a function (weight [L, E], num_physical P, num_groups G, num_nodes N, num_ranks R) -> phy2log [L, P]
int64, as `moemesh.services.eplb.rebalance.rebalance` calls it once `resolve_policy` has checked the name.
"""

from __future__ import annotations

from moemesh.registry import Registry

POLICIES = Registry("EPLB policy")
DEFAULT = "refined"
# DeepSeek's EPLB, slot for slot; auto: hierarchical when the expert groups divide evenly over the nodes, else global.
POLICIES.register("auto", "moemesh.services.eplb.rebalance:place_auto")
POLICIES.register("hierarchical", "moemesh.services.eplb.rebalance:place_hierarchical")
POLICIES.register("global", "moemesh.services.eplb.rebalance:place_global")
# refined: DeepSeek's placement improved by local search, never worse on any layer; the default.
POLICIES.register("refined", "moemesh.services.eplb.refined:place_refined")
POLICIES.register("refined-hierarchical", "moemesh.services.eplb.refined:place_refined_hierarchical")
POLICIES.register("refined-global", "moemesh.services.eplb.refined:place_refined_global")
