"""One simulated instance: a ``SimCore`` (the sim engine's scheduler and
paged-KV model), its registry status, its load reports (built exactly as a
worker's reporter builds them) and the migration reservations it holds."""

from __future__ import annotations

import math
from collections.abc import Callable

from bench.simulator.hardware import HardwarePreset
from gateway.policies import Candidate
from infra.records import InstanceInfo, InstanceStatus, LoadReport
from instance.reporter import make_report
from instance.sim.core import SimCore, SimStep
from migration.plan import admits

MODEL_NAME = "llama-7b"


class SimInstance:
    def __init__(
        self, instance_id: str, hardware: HardwarePreset, status: InstanceStatus, now: float
    ) -> None:
        self.core = SimCore(hardware.sim_config())
        self.started_at = now
        self.info = InstanceInfo(
            instance_id=instance_id, address=f"sim://{instance_id}", model=MODEL_NAME,
            engine="sim", status=status, pid=0, hostname="sim", started_at=now,
            block_size=hardware.block_size, num_blocks_total=hardware.num_blocks,
            max_num_seqs=hardware.max_num_seqs, max_model_len=hardware.max_request_tokens,
        )  # fmt: skip
        self.stepping = False
        """A step event is scheduled."""
        self.pending: SimStep | None = None
        """The step running now: computed at its start, delivered at its end."""
        self.at_step_end: list[Callable[[float], None]] = []
        """Run at the next step boundary (a migration's stop)."""
        self.reserved: dict[str, int] = {}
        """Blocks held for incoming migrations, by migration key."""
        self.version = 0
        """Bumped on every change of the core or the status."""
        self._report: LoadReport | None = None
        self._report_version = -1
        self._num_reports = 0
        self._next_report_s = 0.0
        self.num_reserved = 0
        """Requests dispatched here since its last report."""

    @property
    def instance_id(self) -> str:
        return self.info.instance_id

    @property
    def status(self) -> InstanceStatus:
        return self.info.status

    def set_status(self, status: InstanceStatus) -> None:
        self.info = self.info.model_copy(update={"status": status})
        self.version += 1

    @property
    def is_empty(self) -> bool:
        """Nothing runs, waits, is being delivered, pinned or reserved here."""
        core = self.core
        return not (core.has_work or self.stepping or core.held or core.staging or self.reserved)

    # -- load reports --------------------------------------------------------
    def report(self, now: float, interval_s: float, headroom_blocks: int) -> LoadReport:
        """The latest load report: rebuilt whenever the state changed (period
        0), or once per ``interval_s`` period."""
        if interval_s > 0:
            if self._report is not None and now < self._next_report_s:
                return self._report
            self._next_report_s = (math.floor(now / interval_s) + 1) * interval_s
        elif self._report is not None and self._report_version == self.version:
            return self._report
        self._num_reports += 1
        self._report = make_report(self.info, self.core.load(), seq=self._num_reports,
                                   timestamp=now, headroom_blocks=headroom_blocks)  # fmt: skip
        self._report_version = self.version
        self.num_reserved = 0
        return self._report

    def candidate(self, now: float, interval_s: float, headroom_blocks: int) -> Candidate:
        load = self.report(now, interval_s, headroom_blocks)
        return Candidate(self.info, load, self.num_reserved if interval_s > 0 else 0)

    # -- migration reservations (the destination's Inbox rule) ---------------
    def reserve(self, key: str, num_blocks: int, watermark_blocks: int) -> bool:
        """Hold ``num_blocks`` in total for ``key``; False if that would leave
        fewer than ``watermark_blocks`` free (``Inbox.reserve``'s rule)."""
        held = self.reserved.get(key, 0)
        free = self.core.num_free_blocks - sum(self.reserved.values())
        extra = num_blocks - held
        if not admits(free, extra, watermark_blocks):
            return False
        self.reserved[key] = max(held, num_blocks)
        return True

    def release(self, key: str) -> None:
        self.reserved.pop(key, None)
