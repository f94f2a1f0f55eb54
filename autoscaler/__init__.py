"""Autoscaler: the global scheduler (arrives with its issue)."""
