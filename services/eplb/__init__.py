"""The expert-parallel load balancer service (statistics in, placements out). Until its issue lands it
only answers health, so that the mesh's deployments already include it."""
