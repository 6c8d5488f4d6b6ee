"""Benchmarks: `python -m bench.NAME [--write]`; results and the commands that produced them in docs/PERFORMANCE.md."""
