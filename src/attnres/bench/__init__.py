"""Benchmarks: library code behind ``attnres bench``."""
