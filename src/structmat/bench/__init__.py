"""Benchmarks (need a CUDA GPU): ``structmat.bench.kernels``."""
