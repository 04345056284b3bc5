"""Operational scripts (fault trials, load test); run from the repository root, not installed."""
