"""Benchmarks: scripts that print figures (never assertions on time)."""
