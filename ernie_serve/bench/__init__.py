"""Benchmarks: `ernie-serve bench throughput` (offline engine vs transformers) and `bench serve` (HTTP)."""
