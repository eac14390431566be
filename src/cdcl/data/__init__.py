"""Data: the canonical dataset directory, adapters, the simulated screen, splits, views."""
