"""Live migration of running requests between instances (arrives with its issue)."""
