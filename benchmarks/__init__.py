"""Benchmarks of fsam-ds against baselines in the same run (`python -m benchmarks --help`)."""
