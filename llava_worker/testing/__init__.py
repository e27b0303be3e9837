"""Deterministic tiny checkpoints for tests, the demo and the benchmark; never imported by the server."""
