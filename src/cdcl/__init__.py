"""cdcl: batch-robust representations for high-content screening."""

__version__ = "0.1.0"
