"""cdcl.evaluate."""
