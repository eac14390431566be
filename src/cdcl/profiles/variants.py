"""The profile variants every metric is scored on: as embedded, and standardised per plate."""

VARIANTS = ("raw", "plate_normalized")
