"""Runnable recipes; every one defaults to the embedded offline toy model and data."""
