"""Experiments built on the pipeline: the demo, replicated studies and the batch-strength curve,
their statistics, and the calibration of the simulated screen against real screens."""
