"""Typed records stored in Redis and exchanged between components.

One pydantic model per record; every Redis value Shoal writes is one of these,
serialised as JSON. Infinite floats (an idle instance's freeness, a draining
instance's virtual usage) are written as the strings ``"Infinity"`` /
``"-Infinity"`` so the JSON stays standard.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class Priority(StrEnum):
    """Request priority class, as sent in ``X-Request-Priority``."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """Scheduling rank: lower runs first (vLLM's convention)."""
        return _PRIORITY_RANK[self]

    def at_most(self, maximum: Priority) -> Priority:
        """This priority, but no higher than ``maximum`` (what a caller may have)."""
        return self if self.rank >= maximum.rank else maximum


_PRIORITY_RANK = {Priority.HIGH: 0, Priority.NORMAL: 1, Priority.LOW: 2}


class InstanceStatus(StrEnum):
    """Lifecycle of an instance in the registry."""

    STARTING = "starting"
    ACTIVE = "active"
    DRAINING = "draining"
    STOPPED = "stopped"


class Record(BaseModel):
    """Base of every stored record: strict fields, standard JSON for infinities."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings", frozen=True)


class InstanceInfo(Record):
    """Registry entry of one instance worker (``<ns>:instance:<id>``)."""

    instance_id: str
    address: str = Field(description="Base URL of the worker, e.g. http://127.0.0.1:8100")
    model: str = Field(description="Served model name clients ask for")
    engine: str = Field(description="Engine kind: vllm or sim")
    status: InstanceStatus
    pid: int
    hostname: str
    started_at: float = Field(description="Unix time the worker started")
    block_size: int
    num_blocks_total: int
    max_num_seqs: int
    max_model_len: int
    kv_capacity_tokens: int = Field(
        default=0, description="KV-cache capacity in tokens (num_blocks_total x block_size)"
    )
    platform: str = Field(default="", description="Where the engine runs: cpu, cuda, ..., sim")
    devices: tuple[str, ...] = Field(default=(), description="Devices the engine uses")
    engine_args: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict,
        description="Engine arguments Shoal chose (None: left to the engine), docs/ENGINE.md",
    )


class PriorityCounts(Record):
    """Requests per priority class."""

    high: int = 0
    normal: int = 0
    low: int = 0

    @property
    def total(self) -> int:
        return self.high + self.normal + self.low


class LoadReport(Record):
    """Load of one instance (``<ns>:load:<id>``), published every 50-100 ms.

    ``virtual_usage`` and ``freeness`` follow Llumnix: freeness
    F = (num_blocks_total - virtual_usage) / batch_size, negative when
    overloaded, ``inf`` when the instance is idle, ``-inf`` when draining.
    """

    instance_id: str
    seq: int = Field(description="Monotonic report number of this worker")
    timestamp: float = Field(description="Unix time the report was made")
    status: InstanceStatus
    num_blocks_total: int
    num_blocks_used: int
    num_running: int
    num_waiting: int
    num_preempted_total: int = Field(description="Preemptions since the worker started")
    running_by_priority: PriorityCounts
    waiting_by_priority: PriorityCounts
    virtual_usage: float
    freeness: float
    generation_tokens_per_s: float = 0.0
    num_finished_total: int = 0


class InstanceView(Record):
    """What readers see: a registry entry with its latest load (if any)."""

    info: InstanceInfo
    load: LoadReport | None


class StatusChange(Record):
    """Body of an instance's ``POST /status``: the lifecycle state the
    autoscaler sets (``draining`` before it moves the requests away)."""

    status: InstanceStatus


class AutoscalerState(Record):
    """The leading autoscaler's state (``<ns>:autoscaler``), published every
    tick with a TTL of about five ticks; ``shoal status`` shows it."""

    leader: str = Field(description="Id of the autoscaler holding the lease")
    timestamp: float = Field(description="Unix time of the tick that published it")
    model: str = Field(description="Served model name whose instances it scales")
    migrating: list[str] = Field(description="Instances with a migration in or out in flight")
    num_held: int = Field(description="Requests gateways hold for lack of an instance")
    instance_seconds: float = Field(
        description="Instance-seconds (GPU-seconds on GPU hosts) it has counted while leading"
    )
    scaling_policy: str = Field(description="Registered name of the scaling policy")
    pairing_policy: str = Field(description="Registered name of the pairing policy")
