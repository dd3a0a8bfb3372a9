"""The `moemesh` command line: one subcommand per module in this package."""
