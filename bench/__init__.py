"""Benchmarks: pycni's plugins side by side with the reference Go plugins.

Run `python -m bench --help` from the repository root. Every figure runs both
implementations alternately in one run, each in namespaces of its own, and is
reported as min/median/max plus the ratio pycni/reference of the medians.
See bench/README.md for what each figure means and the latest results.
"""
