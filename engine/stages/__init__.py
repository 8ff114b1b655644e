"""Lifecycle stages: the stage model of ``rules/stages.yaml`` and where a customer stands."""
