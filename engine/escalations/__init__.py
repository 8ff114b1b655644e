"""Escalations: complaint cases worked by support leads, and their notifications."""
