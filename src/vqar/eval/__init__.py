"""Evaluation: reconstruction quality now; generation metrics build on it."""
