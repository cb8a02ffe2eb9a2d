"""Benchmarks of the five methods; each script writes a results file under ``benchmarks/results/``.

Run from the repository root as ``python benchmarks/<name>.py``; every script takes the common flags of
``benchmarks/harness.py``. Benchmarks may reuse the recipes' helpers, never the tests.
"""
