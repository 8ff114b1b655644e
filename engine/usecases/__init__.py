"""Use cases shared by several entry points (CLI, web console, scheduler)."""
