"""Expert parallelism: expert placement, dispatch/combine backends, grouped GEMM backends, TBO."""
