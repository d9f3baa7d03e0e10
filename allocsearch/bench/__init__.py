"""Benchmarks behind ``allocsearch bench``: speed and memory targets live here, measured side by side."""
