"""Training: the loop (``loop.train``), schedules, checkpoints (``checkpoint.load_for_eval``),
torch.distributed helpers. Import the submodules directly; this package imports nothing heavy."""
