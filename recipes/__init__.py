"""Runnable recipes; every one defaults to the embedded offline toy model and data.

Recipes are scripts, not part of the installed package: run them from the repository root,
``python -m recipes.<name>``, as TRL runs its ``trl/scripts``. They import the libraries and the
testbed, never the benchmarks or the tests.
"""
