"""Benchmarks (not tests): JSON under bench/results, sections of docs/benchmarks.md."""
