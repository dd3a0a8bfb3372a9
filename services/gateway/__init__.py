"""The gateway: the mesh's public gRPC edge and its worker registry.

`core.GatewayCore` owns a request's lifecycle (validate, tokenize, route, fan out, stream) and knows
nothing of gRPC servicers, so the REST facade can drive it too; `servicer.py` is the thin gRPC shell
around it and `serve.py` the process entry point.
"""
