"""Evaluation of tuned models against their base."""
