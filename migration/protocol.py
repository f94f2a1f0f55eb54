"""Typed messages of live migration: what an operator (or the autoscaler)
asks of a source instance, the source-destination handshake, and the record
every migration leaves behind."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from infra.contract import SamplingSpec
from infra.records import Priority
from migration.ports import KvStatus

Mode = Literal["kv", "recompute", "auto"]


class Outcome(StrEnum):
    MIGRATED = "migrated"
    """The request continues on the destination."""
    REFUSED = "refused"
    """The destination had no room: nothing changed."""
    SOURCE_FINISHED = "source_finished"
    """The request finished (or was preempted) on the source during a stage."""
    ROLLED_BACK = "rolled_back"
    """The destination failed after the stop: the request resumed on the source."""
    FAILED = "failed"
    """The destination failed before the stop: the request kept running."""


class MigrateRequest(BaseModel):
    """``POST /migrate`` on the source: move requests to ``destination``."""

    model_config = ConfigDict(extra="forbid")

    destination: str = Field(min_length=1, description="base URL of the destination instance")
    request_ids: list[str] | None = Field(default=None, min_length=1)
    count: int | None = Field(default=None, ge=1, description="or this many, chosen by policy")
    policy: str | None = Field(default=None, description="selection policy; None: the default")
    mode: Mode = "auto"
    include_high: bool = Field(default=False, description="let the policy pick high priority")


class ReserveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str = Field(min_length=1)
    num_blocks: int = Field(ge=0)


class HelloRequest(BaseModel):
    """A source's challenge to a destination before anything moves."""

    nonce: str = Field(min_length=16, max_length=128)


class HelloReply(BaseModel):
    """Who the destination is, and its proof that it holds the cluster secret."""

    instance_id: str
    proof: str


class ReserveReply(BaseModel):
    reserved_blocks: int
    """Blocks the destination now holds for incoming migrations, in all."""


class AbortReply(BaseModel):
    ok: bool = True


class KvPortStatus(KvStatus):
    """``GET /migrations/kv``: the instance's KV port (None: it migrates by
    recompute only) and its state."""

    kv_port: str | None


class StageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str = Field(min_length=1)
    source: str = Field(description="host:port of the source's KV endpoint")
    engine_request_id: str
    first: int = Field(ge=0)
    count: int = Field(ge=1)
    grant: str = Field(min_length=16, description="the source's read grant for this migration")


class StageReply(BaseModel):
    bytes: int


class TextState(BaseModel):
    """Where the request's text stands (the instance's incremental
    detokenizer): the tokens of its current window and where the ones not yet
    emitted start."""

    window: list[int]
    read_offset: int = Field(ge=0)
    held: str = ""
    """Text made but held back: it may begin a stop string."""


class ResumeSpec(BaseModel):
    """Everything the destination needs to continue the request."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1)
    request_id: str
    prompt_token_ids: list[int] = Field(min_length=1)
    output_token_ids: list[int]
    num_kv_tokens: int = Field(ge=0, description="leading tokens whose KV is staged")
    emitted_chars: int = Field(default=0, ge=0, description="text characters the client has")
    text: TextState | None = None
    """The source's detokenizer state (None: rebuilt from the output)."""
    sampling: SamplingSpec
    """The request's sampling as first received (``max_tokens`` counts the
    output so far too)."""
    priority: Priority = Priority.NORMAL
    arrival_time: float = 0.0
    resume_token: str | None = None
    """The owner's secret, which its resume must present (it moves with the request)."""
    final: StageRequest | None = None
    """The request's last full blocks, not yet staged: the destination pulls
    them from the source before it admits the request, so the stop costs
    one round trip (None: every full block is staged already)."""
    frozen_for_s: float = Field(
        default=0.0,
        ge=0.0,
        description=(
            "seconds the request had been frozen on the source when it sent the commit: "
            "the destination adds its wait for the first token and records the downtime"
        ),
    )


class CommitReply(BaseModel):
    """The hand-off: the destination's engine has admitted the request (it
    runs, or waits in the queue, with its staged KV) and holds its output for
    the client from now on."""

    admitted_s: float
    """Seconds from the commit's arrival until the engine admitted the request
    (after the final copy)."""
    final_copy_s: float = 0.0
    """Seconds the destination spent pulling the final blocks."""
    final_bytes: int = 0


class AbortMigration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str = Field(min_length=1)


class DowntimeParts(BaseModel):
    """Where a KV migration's downtime goes, as the source sees it: from the
    freeze to the hand-off. The destination reports the rest (the load of
    the staged blocks and the first step) in its :class:`ArrivalRecord`."""

    stop_s: float
    """Freeze to the engine's abort of the request here."""
    final_copy_s: float
    """The destination's pull of the final blocks (0: none were left)."""
    admit_s: float
    """The destination's engine admitting the request."""
    commit_s: float
    """The rest of the commit's round trip (HTTP, serialisation)."""


class ArrivalRecord(BaseModel):
    """A migrated-in request, as the destination saw it up to its first token."""

    key: str
    request_id: str
    mode: Literal["kv", "recompute"]
    frozen_for_s: float
    """Frozen on the source when the commit was sent."""
    final_copy_s: float
    admit_s: float
    load_s: float | None = None
    """Loading the staged blocks into the cache (None: not reported, as by
    the sim engine's port), part of the first step."""
    wait_s: float | None = None
    """Admission to the start of that load: the engine finishing the step it
    was in and scheduling the request (part of the first step)."""
    first_step_s: float | None = None
    """Admission to the first token here (None: it ended without one)."""
    downtime_s: float | None = None
    """Freeze on the source to the first token here."""


class MigrationRecord(BaseModel):
    """One migration attempt of one request, as the source saw it."""

    request_id: str
    source: str
    destination: str
    mode: Literal["kv", "recompute"]
    outcome: Outcome
    stages: int = 0
    blocks: int = 0
    bytes: int = 0
    downtime_s: float | None = None
    """From the freeze on the source to the hand-off (the destination admitted
    the request): the source's share of the downtime. The destination records
    the whole of it, to its first token, in
    ``shoal_instance_migration_downtime_seconds``."""
    downtime: DowntimeParts | None = None
    """``downtime_s`` in its parts."""
    key: str = ""
    """The migration's key (its destination's :class:`ArrivalRecord` has it too)."""
    duration_s: float = 0.0
    started_at: float = 0.0
    error: str | None = None


class MigrationStatus(BaseModel):
    in_flight: list[str]
    reserved_blocks: int
    parked: list[str] = Field(default_factory=list)
    """Migrated-in requests whose client has not yet resumed them here."""
    history: list[MigrationRecord]
    arrivals: list[ArrivalRecord] = Field(default_factory=list)
    """Recent migrations into this instance."""


class RunningRequest(BaseModel):
    """A request in flight on an instance (``GET /requests``)."""

    request_id: str
    engine_request_id: str
    priority: Priority
    num_tokens: int
    num_output: int
    migratable: bool
    frozen: bool
