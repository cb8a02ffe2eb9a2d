"""Benchmarks of the five methods; each script writes a results file under ``benchmarks/results/``."""
