"""Measured ratios: `python -m benchmarks` runs them all (see __main__.py)."""
