"""The provider interface: small enough that a cloud provider (a VM or a
Kubernetes pod per instance) fits in one module.

A provider launches ``shoal instance`` workers with a given id; the worker
registers itself in Redis when ready, and the controller learns of it there.
Stopping is graceful (SIGTERM: the worker finishes, deregisters and exits);
the controller only stops instances that hold no requests."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from infra.procs import shoal_command
from infra.records import InstanceInfo


@dataclass(frozen=True)
class WorkerLaunch:
    """How to start one instance worker."""

    engine: str = "sim"
    args: tuple[str, ...] = ()
    """Extra ``shoal instance`` arguments (model, KV cache size, ...)."""
    env: Mapping[str, str] = field(default_factory=dict)
    python: str = sys.executable

    def command(self, instance_id: str, port: int) -> list[str]:
        return [*shoal_command(python=self.python), "instance", "--engine", self.engine,
                "--port", str(port), "--instance-id", instance_id, *self.args]  # fmt: skip


class Provider(Protocol):
    name: str

    async def start(self, instance_id: str) -> None:
        """Launch a worker; returns once launched (not yet ready)."""
        ...

    async def stop(self, instance_id: str, info: InstanceInfo | None) -> None:
        """Stop the worker gracefully (``info``: its registry entry, which lets
        a provider stop workers another autoscaler launched)."""
        ...

    def launched(self) -> list[str]:
        """Workers this provider launched that have not exited."""
        ...

    async def close(self) -> None:
        """Release the provider on a clean exit: ``local`` stops the workers it
        launched (they are its children); ``ray`` forgets them (detached actors
        outlive it, for a standby to adopt)."""
        ...
