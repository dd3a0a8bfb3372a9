"""The gateway's routing policies by name (`--router`, MOEMESH_ROUTER), one registration line each. Imports
nothing heavy, so parsers and the config take their choices from here; `router.make_router` builds one.

A policy is a `moemesh.services.gateway.router.Router` subclass built without arguments.
"""

from __future__ import annotations

from moemesh.registry import Registry

ROUTERS = Registry("router")
ROUTERS.register("prefix_affinity", "moemesh.services.gateway.router:PrefixAffinityRouter")
ROUTERS.register("least_load", "moemesh.services.gateway.router:LeastLoadRouter")
ROUTERS.register("round_robin", "moemesh.services.gateway.router:RoundRobinRouter")

DEFAULT_ROUTER = "prefix_affinity"
