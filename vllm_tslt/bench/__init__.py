"""Benchmarks: the link-emulation runner and its report."""
