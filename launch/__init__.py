"""Sweep launchers: local GPUs, SLURM array jobs, Cloud TPU VMs (``python -m launch.sweep``)."""
