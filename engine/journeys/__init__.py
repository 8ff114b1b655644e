"""Journeys: decide (the pure planner and its policies), then write (the set-based store)."""
