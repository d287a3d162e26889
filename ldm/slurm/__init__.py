"""SLURM: ``ldm submit`` (batch scripts, sweeps as job arrays, recipes as dependent jobs)."""
