"""Offline training, evaluation and export of the mnistgen-serve models."""
