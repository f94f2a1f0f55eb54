"""Gateway: stateless OpenAI-compatible front door (arrives with its issue)."""
