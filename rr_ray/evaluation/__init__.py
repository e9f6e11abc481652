"""Evaluation: a sandbox for model-written code and the paper's metrics."""
