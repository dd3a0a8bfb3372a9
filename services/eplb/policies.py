"""The EPLB placement policies by name, one registration line each. Imports no torch, so parsers take their
`--policy` choices from here.

A policy is a function (weight [L, E], num_physical P, num_groups G, num_nodes N, num_ranks R) -> phy2log [L, P]
int64, as `moemesh.services.eplb.rebalance.rebalance` calls it once `resolve_policy` has checked the name.
"""

from __future__ import annotations

from moemesh.registry import Registry

POLICIES = Registry("EPLB policy")
# auto: hierarchical when the expert groups divide evenly over the nodes, else global.
POLICIES.register("auto", "moemesh.services.eplb.rebalance:place_auto")
POLICIES.register("hierarchical", "moemesh.services.eplb.rebalance:place_hierarchical")
POLICIES.register("global", "moemesh.services.eplb.rebalance:place_global")
