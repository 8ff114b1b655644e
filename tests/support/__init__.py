"""Helpers shared by the tests and the benchmarks (a package, so that
``python -m tests.support.fake_provider`` runs)."""
