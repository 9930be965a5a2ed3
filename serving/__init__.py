"""Serving side of mnistgen-serve: the Triton launcher, Triton benchmarks and the gateway."""
