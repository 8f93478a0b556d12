"""Benchmarks (not part of the test suite): `python bench/fanout.py` from the repo root."""
