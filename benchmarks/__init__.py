"""Benchmarks: training-step cost and few-shot quality."""
