"""Subcommands of the `cdcl` command line, one module each."""
