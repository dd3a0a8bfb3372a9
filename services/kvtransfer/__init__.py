"""kvtransfer: the KV handoff's control plane (rooms: rendezvous, state machine, leases, layout checks)
and a relay data plane (PushChunks / PullChunks) for networks where prefill cannot reach decode.

`rooms.py` and `relay.py` are pure asyncio and know nothing of gRPC; `servicer.py` maps the RPCs onto
them, `service.py` assembles a server, `serve.py` is the `moemesh serve kvtransfer` entry.
"""
