"""Evaluation: projection tables, fidelity, perplexity, speed."""
