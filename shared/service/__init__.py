"""What every moemesh gRPC service shares: the server shell (health, reflection, error mapping), typed
configuration from flags and `MOEMESH_` environment variables, and the protocol version."""
