"""Deterministic, format-faithful copies of the five upstreams, at a chosen scale."""
