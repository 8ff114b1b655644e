"""Runners: the periodic work (evaluation, dispatch and SLA ticks) and what runs it."""
