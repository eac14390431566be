"""cdcl.models."""
