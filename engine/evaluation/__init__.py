"""Evaluation: compiled conditions through durable_rules (or the pure-Python reference), in worker processes."""
