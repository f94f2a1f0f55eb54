"""The soak's judging, in-process with hand-made records (no processes):
reading streams, classifying them against references, tallying migrations,
leaks and the verdict; its random choices; then one short dry run of
``shoal bench soak --engine sim`` end to end. No timing is asserted."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import psutil
import pytest

from bench.soak.accounting import (
    CALL_ERROR,
    SKIPPED,
    DrainRecord,
    Judgement,
    KillRecord,
    LeakCheck,
    MigrationAttempt,
    Reference,
    StreamOutcome,
    StreamResult,
    Summary,
    Targets,
    Usage,
    base_request_id,
    classify,
    drain_outcomes,
    judge,
    leaks_of,
    read_migrate_reply,
    reason_of,
    render_table,
    summarize,
    to_json,
)
from bench.soak.plan import PromptKind, make_prompts, pick_pair, pick_request
from bench.soak.run import first_difference
from bench.soak.sse import feed_line
from tests.helpers import REPO, SHOAL

USAGE = Usage(5, 3, 8)
REF = Reference("abc", USAGE, "length")


def _stream(**kw: object) -> StreamResult:
    base: dict[str, object] = dict(phase="migrations", prompt=0, started_s=0.0, http_status=200,
                                   request_id="cmpl-1", text="abc", finish_reason="length",
                                   usage=USAGE, done=True)  # fmt: skip
    return StreamResult(**{**base, **kw})  # type: ignore[arg-type]


def _feed(*events: object) -> StreamResult:
    r = StreamResult("migrations", 0, 0.0, http_status=200)
    for e in events:
        feed_line(r, "data: " + (e if isinstance(e, str) else json.dumps(e)))
        feed_line(r, "")
    return r


# -- reading a stream -------------------------------------------------------------
def test_completion_stream_is_read_to_text_finish_usage_and_done() -> None:
    r = _feed(
        {"id": "cmpl-9", "choices": [{"text": "ab", "finish_reason": None}], "usage": None},
        {"id": "cmpl-9", "choices": [{"text": "c", "finish_reason": "length"}]},
        {"id": "cmpl-9", "choices": [], "usage": vars(USAGE)},
        "[DONE]",
    )
    assert (r.request_id, r.text, r.finish_reason, r.usage, r.done, r.errors) == (
        "cmpl-9", "abc", "length", USAGE, True, [])  # fmt: skip


def test_chat_stream_reads_deltas_and_skips_the_role_chunk() -> None:
    r = _feed(
        {"id": "chatcmpl-1", "choices": [{"delta": {"role": "assistant"}, "finish_reason": None}]},
        {"id": "chatcmpl-1", "choices": [{"delta": {"content": "ab"}, "finish_reason": None}]},
        {"id": "chatcmpl-1", "choices": [{"delta": {}, "finish_reason": "length"}]},
        {"id": "chatcmpl-1", "choices": [], "usage": vars(USAGE)},
        "[DONE]",
    )
    assert (r.text, r.finish_reason, r.usage, r.done) == ("ab", "length", USAGE, True)


def test_error_events_malformed_data_and_data_after_done_are_errors() -> None:
    r = _feed({"error": {"message": "the instance failed mid-stream"}}, "{not json", "[DONE]", "{}")
    assert r.errors[0] == "the instance failed mid-stream"
    assert r.errors[1].startswith("malformed event")
    assert r.errors[2].startswith("data after [DONE]")
    feed_line(r, ": a comment")
    assert len(r.errors) == 3


# -- judging one stream -------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "outcome"),
    [
        ({}, StreamOutcome.COMPLETED),
        ({"text": "abd"}, StreamOutcome.CORRUPTED),
        ({"usage": Usage(5, 2, 7)}, StreamOutcome.CORRUPTED),
        ({"finish_reason": "stop"}, StreamOutcome.CORRUPTED),
        ({"done": False}, StreamOutcome.LOST),
        ({"finish_reason": None}, StreamOutcome.LOST),
        ({"usage": None}, StreamOutcome.LOST),
        ({"http_status": None, "done": False, "transport_error": "refused"}, StreamOutcome.LOST),
        ({"http_status": 503, "done": False}, StreamOutcome.ERRORED),
        ({"errors": ["upstream failed"]}, StreamOutcome.ERRORED),
        ({"errors": ["upstream failed"], "done": False, "text": "x"}, StreamOutcome.ERRORED),
    ],
)
def test_classify(kw: dict[str, object], outcome: StreamOutcome) -> None:
    assert classify(_stream(**kw), REF, compare_text=True) is outcome


def test_usage_only_comparison_ignores_text_and_a_missing_reference_is_corruption() -> None:
    assert classify(_stream(text="zzz"), REF, compare_text=False) is StreamOutcome.COMPLETED
    assert classify(_stream(usage=Usage(1, 1, 2)), REF, compare_text=False) is (
        StreamOutcome.CORRUPTED)  # fmt: skip
    assert classify(_stream(), None, compare_text=True) is StreamOutcome.CORRUPTED


# -- migrations, drains, leaks ---------------------------------------------------------
def _attempt(
    outcome: str, *, mode: str = "kv", queued: bool = False, waiting: int = 0, src: str = "a",
    dst: str = "b", error: str | None = None,
) -> MigrationAttempt:  # fmt: skip
    return MigrationAttempt(0.0, src, dst, "cmpl-1", mode, queued, waiting, outcome, error=error)


def test_migrate_replies() -> None:
    rec = {"outcome": "migrated", "mode": "recompute", "downtime_s": 0.01}
    assert read_migrate_reply(200, [rec], "kv").mode == "recompute"
    assert read_migrate_reply(200, [rec], "kv").downtime_s == 0.01
    assert read_migrate_reply(400, {"error": "finished"}, "kv").outcome == SKIPPED
    assert read_migrate_reply(500, "boom", "kv").outcome == CALL_ERROR
    assert read_migrate_reply(200, [], "kv").outcome == CALL_ERROR
    assert read_migrate_reply(200, [{"outcome": "teleported"}], "kv").outcome == CALL_ERROR


def test_migration_tally_by_outcome_mode_state_and_destination_queue() -> None:
    attempts = [
        _attempt("migrated", waiting=2),
        _attempt("migrated", mode="recompute", queued=True, src="b", dst="a"),
        _attempt("failed", queued=True, waiting=1, error="stage of cmpl-0123456789ab failed"),
        _attempt("refused", waiting=3),
        _attempt(SKIPPED),
        _attempt(CALL_ERROR, error="GET http://127.0.0.1:8100/load: timeout"),
    ]
    s = summarize([], attempts, [], [], [])
    m = s.migrations
    assert (m.counted, m.onto_queue, m.onto_queue_share) == (4, 3, 0.75)
    assert m.by_outcome == {"migrated": 2, "failed": 1, "refused": 1, SKIPPED: 1, CALL_ERROR: 1}
    assert m.by_mode == {"kv": {"migrated": 1, "failed": 1, "refused": 1},
                         "recompute": {"migrated": 1}}  # fmt: skip
    assert m.by_state == {"running": {"migrated": 1, "refused": 1},
                          "queued": {"migrated": 1, "failed": 1}}  # fmt: skip
    assert m.by_destination_queue["queue"] == {"migrated": 1, "failed": 1, "refused": 1}
    assert m.by_direction == {"a -> b": 3, "b -> a": 1}
    assert m.reasons["failed: stage of <id> failed"] == 1
    assert m.reasons["call_error: GET http://<addr>/load: timeout"] == 1


def test_reasons_blank_ids_and_addresses() -> None:
    assert reason_of("read to 127.0.0.1:42495: chatcmpl-45bf434fff04~1-28ea6c holds no KV") == (
        "read to <addr>: <id> holds no KV")  # fmt: skip
    assert reason_of(None) == "-"
    assert base_request_id("cmpl-abc.r2") == "cmpl-abc"
    assert base_request_id("cmpl-abc") == "cmpl-abc"


def test_drain_outcomes_count_only_migrations_out_of_the_victim() -> None:
    events = [
        {"kind": "migrated", "data": {"source": "a", "outcomes": ["migrated", "failed"]}},
        {"kind": "migrated", "data": {"source": "a", "outcomes": []}},
        {"kind": "migrated", "data": {"source": "b", "outcomes": ["migrated"]}},
        {"kind": "drain", "data": {"source": "a"}},
    ]
    assert drain_outcomes(events, "a") == {"migrated": 1, "failed": 1}


def test_leaks_of_an_idle_instance_and_of_one_holding_things() -> None:
    idle_mig = {"in_flight": [], "reserved_blocks": 0, "history": []}
    idle_kv = {"kv_port": "127.0.0.1:1", "pinned": [], "delayed": {}, "staging": []}
    idle_load = {"num_running": 0, "num_waiting": 0}
    assert leaks_of(idle_mig, idle_kv, [], idle_load) == []
    assert leaks_of(idle_mig, {"kv_port": None}, [], idle_load) == []  # no KV transfer
    assert leaks_of({**idle_mig, "parked": []}, idle_kv, [], idle_load) == []
    found = leaks_of(
        {"in_flight": ["cmpl-1"], "reserved_blocks": 4, "parked": ["cmpl-2"]},
        {"pinned": ["e1"], "delayed": {"e2": 3}, "staging": ["k"]},
        [{"request_id": "cmpl-3"}], {"num_running": 1, "num_waiting": 2},
    )  # fmt: skip
    assert [f.split("=")[0] for f in found] == [
        "in_flight", "reserved_blocks", "parked", "kv.pinned", "kv.delayed", "kv.staging",
        "requests", "load.num_running", "load.num_waiting"]  # fmt: skip


# -- the verdict -------------------------------------------------------------------------
def _summary(**kw: object) -> Summary:
    completed = [(_stream(), StreamOutcome.COMPLETED, False)]
    s = summarize(completed, [_attempt("migrated", waiting=1)] * 3, [], [], [])
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def test_a_clean_run_passes_and_targets_of_zero_are_not_asked() -> None:
    targets = Targets(migrations=3, onto_queue_share=0.5, kills=0, drains=0)
    assert judge(_summary(), targets) == Judgement((), ())
    assert judge(_summary(), targets).exit_code == 0
    assert "PASS" in render_table(_summary(), judge(_summary(), targets))


def test_failures_exit_1_and_missed_targets_exit_2() -> None:
    short = judge(_summary(), Targets(migrations=10, onto_queue_share=0.5, kills=1, drains=2))
    assert short.failures == ()
    assert short.missed == ("migrations 3 < 10", "kills 0 < 1", "drain cycles 0 < 2")
    assert short.exit_code == 2
    s = _summary(leaks=1, drains_stuck=2, crashes=1, fatal="no gateway")
    s.streams.lost, s.streams.errored = 1, 4
    bad = judge(s, Targets(0, 0, 0, 0))
    assert bad.failures == ("1 stream(s) lost", "4 stream(s) with client-visible errors",
                            "1 instance(s) leaking", "2 drain cycle(s) stuck",
                            "1 instance crash(es)", "stopped early: no gateway")  # fmt: skip
    assert bad.exit_code == 1
    assert "FAIL" in render_table(s, bad)


def test_failed_streams_are_counted_by_prompt_kind() -> None:
    streams = [(_stream(kind="chat"), StreamOutcome.COMPLETED, False),
               (_stream(kind="completion-ids"), StreamOutcome.CORRUPTED, False),
               (_stream(kind="completion-ids"), StreamOutcome.CORRUPTED, False),
               (_stream(kind="chat"), StreamOutcome.LOST, False)]  # fmt: skip
    s = summarize(streams, [], [], [], [])
    assert s.streams.failed_by_kind == {"corrupted completion-ids": 2, "lost chat": 1}
    assert "corrupted completion-ids 2" in render_table(s, judge(s, Targets(0, 0, 0, 0)))


def test_first_difference_and_common_tail() -> None:
    d = first_difference("abcXYZtail", "abcZtail")
    assert (d["at_char"], d["common_tail_chars"], d["expected_chars"], d["got_chars"]) == (
        3, 5, 10, 8)  # fmt: skip
    assert first_difference("same", "same")["at_char"] == 4


def test_kills_join_replayed_requests_to_their_streams() -> None:
    streams = [(_stream(request_id="cmpl-a"), StreamOutcome.COMPLETED, False),
               (_stream(request_id="cmpl-b"), StreamOutcome.ERRORED, False)]  # fmt: skip
    kills = [KillRecord(1.0, 0, "i0", ("cmpl-a", "cmpl-b")),
             KillRecord(2.0, 1, "i1", ("cmpl-a.r1", "cmpl-gone"))]  # fmt: skip
    s = summarize(streams, [], kills, [], [])
    assert (s.kills, s.streams_hit_by_kills, s.streams_hit_by_kills_failed) == (2, 3, 2)


def test_drain_and_leak_tallies() -> None:
    drains = [
        DrainRecord(0.0, 0, "i0", False, 5, {"migrated": 4, "failed": 2}, True, 1.0,
                    failure_reasons={"failed: holds no KV": 2}),
        DrainRecord(1.0, 1, "i1", True, 6, {"migrated": 6}, True, 2.0, "i1b"),
        DrainRecord(2.0, 0, "i0", False, 3, {}, False, 120.0, error="stuck"),
    ]  # fmt: skip
    leaks = [LeakCheck("i0", (), 0.5), LeakCheck("i1b", ("kv.pinned=['x']",), 90.0)]
    s = summarize([], [], [], drains, leaks)
    assert (s.drains, s.drains_full, s.drains_stuck, s.leaks) == (2, 1, 1, 1)
    assert s.drain_migrations == {"migrated": 10, "failed": 2}
    assert s.drain_reasons == {"failed: holds no KV": 2}
    assert json.loads(json.dumps(to_json(s)))["drain_migrations"] == {"migrated": 10, "failed": 2}


# -- the random choices ----------------------------------------------------------------------
def test_prompts_are_seeded_cycle_kinds_and_ask_for_greedy_fixed_length_output() -> None:
    a = make_prompts(6, seed=1, lengths=(4, 9), max_tokens=(16, 32))
    assert a == make_prompts(6, seed=1, lengths=(4, 9), max_tokens=(16, 32))
    assert a != make_prompts(6, seed=2, lengths=(4, 9), max_tokens=(16, 32))
    assert [p.kind for p in a[:3]] == list(PromptKind)
    assert [p.max_tokens for p in a] == [16, 32] * 3
    body = a[0].openai_body("m")
    assert body["prompt"] == list(a[0].ids) and 4 <= len(body["prompt"]) <= 9
    assert (body["temperature"], body["ignore_eos"], body["stream_options"]) == (
        0.0, True, {"include_usage": True})  # fmt: skip
    assert a[2].path == "/v1/chat/completions"
    assert a[2].openai_body("m")["messages"][0]["content"] == a[2].text
    ref = a[1].generate_body("ref-1")
    assert (ref["prompt"], ref["migratable"], ref["stream"]) == (a[1].text, False, False)


def test_pick_request_moves_only_movable_requests_queued_or_running() -> None:
    rng = random.Random(0)
    listing = [
        {"request_id": "q", "num_output": 0, "migratable": True, "frozen": False},
        {"request_id": "r", "num_output": 7, "migratable": True, "frozen": False},
        {"request_id": "direct", "num_output": 3, "migratable": False, "frozen": False},
        {"request_id": "moving", "num_output": 3, "migratable": True, "frozen": True},
    ]
    assert pick_request(rng, listing, 1.0) == ("q", True)
    assert pick_request(rng, listing, 0.0) == ("r", False)
    assert pick_request(rng, listing[1:], 1.0) == ("r", False)  # no queued one to pick
    assert pick_request(rng, listing[2:], 0.5) is None


def test_pick_pair_covers_every_direction() -> None:
    rng = random.Random(0)
    pairs = {pick_pair(rng, ["a", "b", "c"]) for _ in range(200)}
    assert pairs == {(x, y) for x in "abc" for y in "abc" if x != y}
    assert pick_pair(rng, ["a"]) is None


# -- end to end ------------------------------------------------------------------------------
def test_sim_dry_run_end_to_end(tmp_path: Path) -> None:
    """A short soak over two sim instances: every phase runs to its target,
    the results say what the exit code says, and no process is left behind."""
    out = tmp_path / "soak"
    proc = subprocess.run(
        [*SHOAL, "bench", "soak", "--engine", "sim", "--sim-speedup", "4", "--prompts", "12",
         "--max-tokens", "48,96", "--migrations", "12", "--kills", "1", "--drains", "2",
         "--full-drain-every", "2", "--settle-timeout-s", "30", "--stream-timeout-s", "60",
         "--out", str(out), "--log-level", "WARNING"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode in (0, 1, 2), proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["verdict"]["exit_code"] == proc.returncode
    assert "verdict" in proc.stdout and "streams" in proc.stdout
    summary = doc["summary"]
    assert summary["migrations"]["counted"] >= 12
    assert summary["kills"] == 1 and summary["drains"] + summary["drains_stuck"] >= 2
    assert summary["streams"]["requests"] == len(doc["streams"]) > 0
    assert len(doc["leak_checks"]) == 2
    namespace = doc["cluster"]["namespace"]
    left = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("SHOAL_NAMESPACE") == namespace:
                left.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    assert left == []
