"""Benchmarks (results in bench/RESULTS.md) and the baselines they compare against."""
