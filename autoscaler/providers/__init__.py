"""Where instances run: ``local`` processes on this machine (the default) or
``ray`` actors on a Ray cluster. See :class:`base.Provider`."""

from autoscaler.providers.base import Provider, WorkerLaunch

__all__ = ["Provider", "WorkerLaunch"]
