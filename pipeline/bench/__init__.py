"""Benchmarks that need the whole pipeline: the full-scale dry run of ``make bench-scale``."""
