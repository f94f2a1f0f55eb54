"""What one simulation runs: the cluster, the policies by registered name and
their configs, the mechanism's knobs, and the hardware preset."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from autoscaler.policies import PairingConfig, ScalingConfig
from bench.simulator.hardware import LLAMA_7B_A10, HardwarePreset
from instance.reporter import ReporterConfig
from migration.plan import StagePlan

MigrationMode = Literal["auto", "kv", "recompute"]


@dataclass(frozen=True)
class SimulationConfig:
    """A cluster run in virtual time (see docs/SIMULATOR.md)."""

    num_instances: int = 16
    """Instances active at time 0 (provisioned, no cold start)."""
    dispatch: str | None = None
    """Dispatch policy (``gateway.policies`` registry; None: its default)."""
    scaling: str = "static"
    """Scaling policy (``autoscaler.policies`` registry)."""
    scaling_config: ScalingConfig = field(
        default_factory=lambda: ScalingConfig(min_instances=16, max_instances=16)
    )
    """The scaling policy's knobs, the live ones (``start_timeout_s``: a
    scale-out whose cold start lasts longer never becomes active)."""
    pairing: str | None = None
    """Pairing policy (``autoscaler.policies`` registry; None: its default)."""
    pairing_config: PairingConfig = field(default_factory=PairingConfig)
    """The pairing policy's knobs, the live ones."""
    migration: bool = True
    """Off: the pairing policy is never asked (no request moves, not even to
    drain: a draining instance empties as its requests finish)."""
    selection: str | None = None
    """Request selection on a source when a decision names none (None: the
    registry's default, as the controller uses)."""
    migration_mode: MigrationMode = "auto"
    """KV transfer or recompute, as ``migration.policies.choose_mode`` picks."""
    kv_transfer: bool = True
    """Instances can move KV (off: every migration recomputes)."""
    stage_plan: StagePlan = field(default_factory=StagePlan)
    """Multi-stage copy limits, the live source's defaults."""
    reservation_watermark_blocks: int = 4
    """A destination refuses a stage that would leave fewer free blocks
    (``migration.destination.Inbox``'s default)."""
    tick_s: float = 0.5
    """Autoscaler period (``ControllerConfig.tick_s``)."""
    report_interval_s: float = 0.0
    """Load-report period seen by dispatch and the autoscaler; 0 = always
    fresh. With a period, requests dispatched since an instance's last
    report count as its reservations (as the gateway's Redis reservations)."""
    headroom_blocks: int = ReporterConfig.headroom_blocks
    """Virtual usage reserved per running high-priority request."""
    priorities: bool = True
    """Off: every request is served as normal priority (dispatch, the engine's
    queue order, headroom, the pairing policy's protection and migration
    selection all see ``normal``); results still group requests by their
    trace priority, and report ``normal`` as the effective priority. The
    baseline of Llumnix's Figure 13."""
    hardware: HardwarePreset = LLAMA_7B_A10
    """Model and GPU: the latency model, KV capacity, KV transfer, cold start."""
    cold_start_s: float | None = None
    """Scale-out to active; None takes the hardware preset's."""
    seed: int = 0
    """Seed of the dispatch policy's random stream (``random``)."""
    max_events: int = 50_000_000
    """Safety stop: a run that needs more events is reported as stuck."""

    def __post_init__(self) -> None:
        if self.num_instances < 0 or self.tick_s <= 0 or self.report_interval_s < 0:
            raise ValueError(
                f"need num_instances >= 0 ({self.num_instances}), tick_s > 0 "
                f"({self.tick_s}), report_interval_s >= 0 ({self.report_interval_s})"
            )
        if self.num_instances > self.scaling_config.max_instances:
            raise ValueError(
                f"num_instances={self.num_instances} above the scaling config's "
                f"max_instances={self.scaling_config.max_instances}"
            )

    @property
    def effective_cold_start_s(self) -> float:
        return self.hardware.cold_start_s if self.cold_start_s is None else self.cold_start_s
