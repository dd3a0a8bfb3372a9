"""moemesh services, one package each, and the `moemesh` command line."""
