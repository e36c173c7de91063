"""Cluster launch helpers: SLURM, DeepSpeed multi-node and Ray cluster jobs."""
