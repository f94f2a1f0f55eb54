"""Benchmarks: scripts that print tables and save plots (see docs/BENCHMARKS.md)."""
