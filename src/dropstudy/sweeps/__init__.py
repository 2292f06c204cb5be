"""Sweeps: planning, searching, running (any launcher, or batches in this process), resuming, SLURM."""
