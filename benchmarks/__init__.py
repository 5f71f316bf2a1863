"""Benchmarks: gows against Apache, nginx and Python peers, in one command (`make bench`)."""
