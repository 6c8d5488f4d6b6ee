"""Launchers: `python -m launch local|slurm|plan CONFIG ...`. All run the same entry point, pipeline.train."""
