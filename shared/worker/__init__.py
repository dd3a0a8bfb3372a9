"""What prefill and decode workers share beyond the generic gRPC shell of `moemesh.service`: the worker process
(an engine on its thread, its KV layout, registration with the gateway), the engine and EP options and the
EP rank launcher, calls to kvtransfer, and expert load reporting."""
