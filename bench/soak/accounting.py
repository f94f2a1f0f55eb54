"""What the soak records and how it judges it: typed records of every stream,
migration, kill, drain cycle and leak check, their tallies, the verdict and
the printed table. Pure: no I/O, no clock, so tests build records by hand."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Phase(StrEnum):
    MIGRATIONS = "migrations"
    KILLS = "kills"
    DRAINS = "drains"


PHASES = tuple(Phase)

INSTANCE_OUTCOMES = ("migrated", "refused", "source_finished", "rolled_back", "failed")
"""``migration.protocol.Outcome`` values, repeated so this module imports nothing
of the system under test."""
SKIPPED = "skipped"
"""``POST /migrate`` answered 400: the request finished or started moving
between the soak's ``GET /requests`` and its ask (a race, not a fault)."""
CALL_ERROR = "call_error"
"""``POST /migrate`` failed otherwise (5xx, timeout, connection): suspicious."""

_IDS = re.compile(r"(chat)?cmpl-[0-9a-f]{8,}\S*|ref-\S+|soak-anchor-\S+")
_ADDRESSES = re.compile(r"\d+\.\d+\.\d+\.\d+:\d+")


def reason_of(error: str | None) -> str:
    """An error message with request ids and addresses blanked, so equal
    causes count together."""
    if not error:
        return "-"
    text = _ADDRESSES.sub("<addr>", _IDS.sub("<id>", error))
    return text if len(text) <= 140 else text[:137] + "..."


def base_request_id(request_id: str) -> str:
    """The client's request id of an instance's request: the gateway may
    replay a broken stream under ``<id>.r<N>``."""
    return re.sub(r"\.r\d+$", "", request_id)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Usage:
        return cls(int(raw["prompt_tokens"]), int(raw["completion_tokens"]),
                   int(raw["total_tokens"]))  # fmt: skip


@dataclass(frozen=True)
class Reference:
    """A prompt's output computed once, unmigrated (greedy, ``ignore_eos``)."""

    text: str
    usage: Usage
    finish_reason: str | None


# -- streams ------------------------------------------------------------------
class StreamOutcome(StrEnum):
    COMPLETED = "completed"
    """Ended with a finish reason, usage and ``[DONE]``, equal to its reference."""
    CORRUPTED = "corrupted"
    """Ended properly, but its text, usage or finish reason differ from the reference."""
    LOST = "lost"
    """Ended without a finish (connection dropped, stalled, no ``[DONE]``) or never answered."""
    ERRORED = "errored"
    """The client saw an error: an HTTP error status or an error event in the stream."""


@dataclass
class StreamResult:
    """One OpenAI streaming call through the gateway, as the client saw it."""

    phase: str
    prompt: int
    started_s: float
    kind: str = ""
    """The prompt's kind (``plan.PromptKind``): token ids, text or chat."""
    ended_s: float = 0.0
    http_status: int | None = None
    request_id: str | None = None
    """The response's ``id``: the gateway's request id, which instances list in
    ``GET /requests`` (so migrations and kills can be joined to streams)."""
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    done: bool = False
    """``data: [DONE]`` arrived."""
    errors: list[str] = field(default_factory=list)
    """Error events in the stream, or the body of an HTTP error."""
    transport_error: str | None = None
    """The connection failed or stalled (no HTTP status or a cut stream)."""


def classify(result: StreamResult, ref: Reference | None, *, compare_text: bool) -> StreamOutcome:
    """Errors the client saw win over everything; then a stream that did not
    end properly is lost; then it must equal its reference."""
    if (result.http_status is not None and result.http_status != 200) or result.errors:
        return StreamOutcome.ERRORED
    if not result.done or result.finish_reason is None or result.usage is None:
        return StreamOutcome.LOST
    if ref is None or result.usage != ref.usage or result.finish_reason != ref.finish_reason:
        return StreamOutcome.CORRUPTED
    if compare_text and result.text != ref.text:
        return StreamOutcome.CORRUPTED
    return StreamOutcome.COMPLETED


# -- migrations, kills, drains, leaks -------------------------------------------
@dataclass(frozen=True)
class MigrationAttempt:
    """One ``POST /migrate`` of one request by the soak."""

    t_s: float
    source: str
    destination: str
    request_id: str
    mode: str
    queued: bool
    """The request had no output yet (``num_output == 0``): still waiting."""
    destination_waiting: int
    """Requests waiting on the destination just before the ask (``GET /load``)."""
    outcome: str
    """One of :data:`INSTANCE_OUTCOMES`, :data:`SKIPPED` or :data:`CALL_ERROR`."""
    downtime_s: float | None = None
    error: str | None = None
    moved_before: bool = False
    """The soak had migrated this request before: it has output but may be
    waiting again in its new instance's queue (``GET /requests`` does not say)."""

    @property
    def state(self) -> str:
        if self.queued:
            return "queued"
        return "moved in earlier" if self.moved_before else "running"

    @property
    def counted(self) -> bool:
        """The source ran the migration and recorded an outcome."""
        return self.outcome in INSTANCE_OUTCOMES


@dataclass(frozen=True)
class MigrateReply:
    """What a ``POST /migrate`` of one request came to."""

    outcome: str
    mode: str
    downtime_s: float | None = None
    error: str | None = None


def read_migrate_reply(status: int, reply: Any, asked_mode: str) -> MigrateReply:
    """A 400 means the request finished or began moving after the listing (a
    race: skipped); a list of one record is the source's outcome; anything
    else is a failed call."""
    if status == 400:
        return MigrateReply(SKIPPED, asked_mode, error=str(reply)[:300])
    if status != 200 or not isinstance(reply, list) or len(reply) != 1:
        return MigrateReply(CALL_ERROR, asked_mode, error=f"HTTP {status}: {str(reply)[:300]}")
    rec = reply[0] if isinstance(reply[0], Mapping) else {}
    outcome = rec.get("outcome")
    if outcome not in INSTANCE_OUTCOMES:
        return MigrateReply(CALL_ERROR, asked_mode, error=f"unknown record: {str(rec)[:300]}")
    return MigrateReply(str(outcome), str(rec.get("mode", asked_mode)), rec.get("downtime_s"),
                        rec.get("error"))  # fmt: skip


def drain_outcomes(events: Iterable[Mapping[str, Any]], source: str) -> Counter[str]:
    """Outcomes of the autoscaler's migrations out of ``source``, from its
    events (``{"kind", "ts", "data"}``; ``migrated`` events list them)."""
    outcomes: Counter[str] = Counter()
    for e in events:
        data = e.get("data") or {}
        if e.get("kind") == "migrated" and data.get("source") == source:
            outcomes.update(str(o) for o in data.get("outcomes") or [])
    return outcomes


@dataclass(frozen=True)
class KillRecord:
    t_s: float
    slot: int
    instance_id: str
    request_ids: tuple[str, ...]
    """Requests the instance listed just before it was killed."""
    restarted_as: str | None = None
    restart_s: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class DrainRecord:
    t_s: float
    slot: int
    instance_id: str
    full: bool
    """The autoscaler stopped the drained instance (then the soak restarted it);
    otherwise an anchor request kept it alive and it was set active again."""
    requests_at_start: int
    autoscaler_outcomes: Mapping[str, int]
    """Outcomes of the autoscaler's migrations out of it during the cycle."""
    completed: bool
    """Every migratable request left (and, for a full drain, the instance stopped)."""
    duration_s: float
    restarted_as: str | None = None
    error: str | None = None
    failure_reasons: Mapping[str, int] = field(default_factory=dict)
    """Why the victim's migrations during the cycle did not succeed (its
    ``GET /migrations`` history; not available after a full drain)."""


@dataclass(frozen=True)
class LeakCheck:
    instance_id: str
    leaks: tuple[str, ...]
    """What was still held when the settle time ran out (empty: clean)."""
    settle_s: float
    """How long it took to become clean (or the whole wait)."""


def leaks_of(migrations: Mapping[str, Any], kv: Mapping[str, Any],
             requests: Sequence[Any], load: Mapping[str, Any]) -> list[str]:  # fmt: skip
    """What an idle instance should not hold, from its ``GET /migrations``,
    ``/migrations/kv``, ``/requests`` and ``/load``. ``parked`` is optional (an
    instance without it has nothing to park); ``/migrations/kv`` of an
    instance without KV transfer is ``{"kv_port": null}``."""
    found = []
    if migrations.get("in_flight"):
        found.append(f"in_flight={list(migrations['in_flight'])}")
    if migrations.get("reserved_blocks", 0):
        found.append(f"reserved_blocks={migrations['reserved_blocks']}")
    if migrations.get("parked"):
        found.append(f"parked={list(migrations['parked'])}")
    for key in ("pinned", "delayed", "staging"):
        if kv.get(key):
            found.append(f"kv.{key}={_short(kv[key])}")
    if requests:
        found.append(f"requests={[_rid(r) for r in requests]}")
    for key in ("num_running", "num_waiting"):
        if load.get(key, 0):
            found.append(f"load.{key}={load[key]}")
    return found


def _rid(r: Any) -> str:
    return str(r.get("request_id")) if isinstance(r, Mapping) else str(r)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


# -- tallies --------------------------------------------------------------------
@dataclass
class StreamTally:
    requests: int = 0
    completed: int = 0
    lost: int = 0
    corrupted: int = 0
    errored: int = 0
    text_differs: int = 0
    """Completed streams whose text differs from the reference, counted when
    text is not compared (``--compare usage``)."""
    failed_by_kind: Counter[str] = field(default_factory=Counter)
    """``<outcome> <prompt kind>`` of the streams that did not complete."""

    def add(self, outcome: StreamOutcome, kind: str, *, text_differs: bool) -> None:
        self.requests += 1
        setattr(self, outcome.value, getattr(self, outcome.value) + 1)
        self.text_differs += int(text_differs and outcome is StreamOutcome.COMPLETED)
        if outcome is not StreamOutcome.COMPLETED:
            self.failed_by_kind[f"{outcome.value} {kind or '?'}"] += 1


@dataclass
class MigrationTally:
    counted: int = 0
    """Attempts the source ran (any instance outcome): what the target counts."""
    onto_queue: int = 0
    """Of those, onto a destination that had requests waiting."""
    by_outcome: Counter[str] = field(default_factory=Counter)
    by_mode: dict[str, Counter[str]] = field(default_factory=dict)
    by_state: dict[str, Counter[str]] = field(default_factory=dict)
    """``queued`` / ``running`` / ``moved in earlier`` -> outcome counts."""
    by_destination_queue: dict[str, Counter[str]] = field(default_factory=dict)
    """``queue`` / ``no queue`` -> outcome counts."""
    by_direction: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    """``outcome: reason`` of every attempt that did not migrate."""

    def add(self, m: MigrationAttempt) -> None:
        self.by_outcome[m.outcome] += 1
        if m.outcome != "migrated":
            self.reasons[f"{m.outcome}: {reason_of(m.error)}"] += 1
        if not m.counted:
            return
        self.counted += 1
        self.onto_queue += int(m.destination_waiting > 0)
        self.by_mode.setdefault(m.mode, Counter())[m.outcome] += 1
        self.by_state.setdefault(m.state, Counter())[m.outcome] += 1
        dq = "queue" if m.destination_waiting > 0 else "no queue"
        self.by_destination_queue.setdefault(dq, Counter())[m.outcome] += 1
        self.by_direction[f"{m.source} -> {m.destination}"] += 1

    @property
    def onto_queue_share(self) -> float:
        return self.onto_queue / self.counted if self.counted else 0.0


@dataclass
class Summary:
    streams: StreamTally
    streams_by_phase: dict[str, StreamTally]
    migrations: MigrationTally
    kills: int
    kill_errors: int
    streams_hit_by_kills: int
    """Streams whose request was on an instance when it was killed."""
    streams_hit_by_kills_failed: int
    """Of those, streams that did not complete (lost, errored or corrupted)."""
    drains: int
    drains_full: int
    drains_stuck: int
    drain_migrations: Counter[str]
    """Outcomes of the autoscaler's migrations during drain cycles."""
    drain_reasons: Counter[str]
    """Why the autoscaler's drain migrations did not succeed (partial cycles)."""
    leaks: int
    """Instances still holding something after the settle time."""
    autoscaler_errors: int
    """``error`` / ``migration_failed`` events the autoscaler recorded."""
    reference_mismatches: int
    """Prompts whose reference differed between two instances (non-determinism)."""
    crashes: int = 0
    """Instances that died without being killed or stopped by the soak."""
    fatal: str | None = None
    """What stopped the soak early (an instance that would not start, ...)."""
    interrupted: bool = False


def summarize(
    streams: Iterable[tuple[StreamResult, StreamOutcome, bool]],
    migrations: Iterable[MigrationAttempt],
    kills: Iterable[KillRecord],
    drains: Iterable[DrainRecord],
    leaks: Iterable[LeakCheck],
    *,
    autoscaler_errors: int = 0,
    reference_mismatches: int = 0,
    crashes: int = 0,
    fatal: str | None = None,
    interrupted: bool = False,
) -> Summary:
    """Tallies of everything recorded; ``streams`` are (result, outcome, text differs)."""
    total, by_phase = StreamTally(), dict[str, StreamTally]()
    outcome_of: dict[str, StreamOutcome] = {}
    for result, outcome, differs in streams:
        total.add(outcome, result.kind, text_differs=differs)
        by_phase.setdefault(result.phase, StreamTally()).add(outcome, result.kind,
                                                             text_differs=differs)  # fmt: skip
        if result.request_id:
            outcome_of[result.request_id] = outcome
    tally = MigrationTally()
    for m in migrations:
        tally.add(m)
    kill_list, drain_list = list(kills), list(drains)
    hit = {base_request_id(r) for k in kill_list for r in k.request_ids}
    drain_migrations: Counter[str] = Counter()
    drain_reasons: Counter[str] = Counter()
    for d in drain_list:
        drain_migrations.update(d.autoscaler_outcomes)
        drain_reasons.update(d.failure_reasons)
    return Summary(
        streams=total, streams_by_phase=by_phase, migrations=tally, kills=len(kill_list),
        kill_errors=sum(1 for k in kill_list if k.error), streams_hit_by_kills=len(hit),
        streams_hit_by_kills_failed=sum(
            1 for r in hit if outcome_of.get(r, StreamOutcome.LOST) is not StreamOutcome.COMPLETED
        ),
        drains=sum(1 for d in drain_list if d.completed),
        drains_full=sum(1 for d in drain_list if d.completed and d.full),
        drains_stuck=sum(1 for d in drain_list if not d.completed),
        drain_migrations=drain_migrations, drain_reasons=drain_reasons,
        leaks=sum(1 for c in leaks if c.leaks),
        autoscaler_errors=autoscaler_errors, reference_mismatches=reference_mismatches,
        crashes=crashes, fatal=fatal, interrupted=interrupted,
    )  # fmt: skip


# -- verdict ----------------------------------------------------------------------
@dataclass(frozen=True)
class Targets:
    migrations: int = 1000
    onto_queue_share: float = 1 / 3
    kills: int = 20
    drains: int = 100


@dataclass(frozen=True)
class Judgement:
    failures: tuple[str, ...]
    """Something went wrong in the system under test (exit 1)."""
    missed: tuple[str, ...]
    """The run was clean but fell short of a target, e.g. ran out of time (exit 2)."""

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 2 if self.missed else 0


def judge(s: Summary, targets: Targets) -> Judgement:
    """Lost, corrupted or errored streams, leaks, stuck drains, failed kills
    and non-deterministic references fail the run; targets only count for
    phases that were asked for (a target of 0 skips its phase)."""
    failures = [
        f"{n} {what}"
        for n, what in (
            (s.streams.lost, "stream(s) lost"),
            (s.streams.corrupted, "stream(s) corrupted"),
            (s.streams.errored, "stream(s) with client-visible errors"),
            (s.leaks, "instance(s) leaking"),
            (s.drains_stuck, "drain cycle(s) stuck"),
            (s.kill_errors, "kill(s) not restarted"),
            (s.reference_mismatches, "reference(s) differing between instances"),
            (s.crashes, "instance crash(es)"),
        )
        if n
    ]
    if s.fatal:
        failures.append(f"stopped early: {s.fatal}")
    if s.interrupted:
        failures.append("interrupted")
    missed = []
    m = s.migrations
    if targets.migrations and m.counted < targets.migrations:
        missed.append(f"migrations {m.counted} < {targets.migrations}")
    if targets.migrations and m.onto_queue_share < targets.onto_queue_share:
        missed.append(f"onto a queue {m.onto_queue_share:.0%} < {targets.onto_queue_share:.0%}")
    if targets.kills and s.kills < targets.kills:
        missed.append(f"kills {s.kills} < {targets.kills}")
    if targets.drains and s.drains < targets.drains:
        missed.append(f"drain cycles {s.drains} < {targets.drains}")
    return Judgement(tuple(failures), tuple(missed))


# -- rendering ------------------------------------------------------------------
def _counts(c: Mapping[str, int], order: Sequence[str] = INSTANCE_OUTCOMES) -> str:
    keys = [k for k in order if c.get(k)] + sorted(k for k in c if k not in order and c[k])
    return ", ".join(f"{k} {c[k]}" for k in keys) or "-"


def _reasons(label: str, reasons: Counter[str], top: int = 4) -> list[str]:
    return [f"{label if i == 0 else '':<28} {n} x {why}"
            for i, (why, n) in enumerate(reasons.most_common(top))]  # fmt: skip


def render_table(s: Summary, j: Judgement) -> str:
    st = s.streams
    lines = [
        f"{'streams':<28} {st.requests} requests: {st.completed} completed, {st.lost} lost, "
        f"{st.corrupted} corrupted, {st.errored} errored"
        + (f" ({st.text_differs} completed with other text, not compared)"
           if st.text_differs else ""),
    ]  # fmt: skip
    if st.failed_by_kind:
        lines.append(f"{'  by prompt kind':<28} {_counts(st.failed_by_kind, ())}")
    for phase, t in s.streams_by_phase.items():
        lines.append(f"{'  ' + phase:<28} {t.requests} requests: {t.completed} completed, "
                     f"{t.lost} lost, {t.corrupted} corrupted, {t.errored} errored")  # fmt: skip
    m = s.migrations
    lines.append(f"{'migrations':<28} {m.counted} run ({_counts(m.by_outcome)}); onto a queue "
                 f"{m.onto_queue} ({m.onto_queue_share:.0%})")  # fmt: skip
    for label, table in (("by mode", m.by_mode), ("by request state", m.by_state),
                         ("by destination", m.by_destination_queue)):  # fmt: skip
        for key in sorted(table):
            lines.append(f"{'  ' + label + ' ' + key:<28} {_counts(table[key])}")
    lines.append(f"{'  directions':<28} {_counts(m.by_direction, ())}")
    lines += _reasons("  why not migrated", m.reasons)
    lines.append(f"{'kills':<28} {s.kills} ({s.streams_hit_by_kills} streams on the killed "
                 f"instances, {s.streams_hit_by_kills_failed} of them not completed; "
                 f"{s.kill_errors} not restarted)")  # fmt: skip
    lines.append(f"{'drain cycles':<28} {s.drains} completed ({s.drains_full} full), "
                 f"{s.drains_stuck} stuck; autoscaler migrations "
                 f"{_counts(s.drain_migrations)}")  # fmt: skip
    lines += _reasons("  why not migrated", s.drain_reasons)
    lines.append(f"{'leaking instances':<28} {s.leaks}")
    lines.append(f"{'autoscaler error events':<28} {s.autoscaler_errors}")
    if s.reference_mismatches:
        lines.append(f"{'reference mismatches':<28} {s.reference_mismatches}")
    if s.crashes:
        lines.append(f"{'instance crashes':<28} {s.crashes}")
    verdict = "FAIL: " + "; ".join(j.failures) if j.failures else "PASS"
    if j.missed:
        verdict += ("" if j.failures else " (targets missed)") + " — missed: " + "; ".join(j.missed)
    lines.append(f"{'verdict':<28} {verdict}")
    return "\n".join(lines)


def to_json(obj: Any) -> Any:
    """Records and tallies as plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_json(v) for v in obj]
    return obj
