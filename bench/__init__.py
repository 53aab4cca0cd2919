"""Benchmarks: ``margin-engine bench ...`` (results under bench/results/)."""
