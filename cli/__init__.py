"""The `moe-tier` command: argument parsing and rich output live here and nowhere else."""
