"""The decode service: receives a request's KV from a prefill worker (or prefills it itself, colocated),
joins it to the running batch and streams tokens."""
