"""moemesh's benchmarks, outside the runtime: each compares things side by side in one run and prints ratios.
`moemesh bench NAME` runs them (`cli.py` builds that command); docs/benchmarks.md holds their figures."""
