"""Benchmarks that `python -m platform.bench` runs: scripts that print numbers, never library code."""
