"""Shared plumbing: settings, the Redis state store and its key schema, the
embedded Redis-compatible server, telemetry and the `shoal` command line."""
