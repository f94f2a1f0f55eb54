"""Gateways' traffic through a real Valkey: batches of several replicas merge
into one summary on the server's clock; the stream is capped; a bad entry is
skipped; a gateway's recorder flushes on its own and on stop."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio import Redis

from gateway.traffic import TrafficRecorder
from infra.keys import KeySchema
from infra.records import Priority
from infra.traffic import TrafficBatch
from infra.traffic_board import TrafficBoard


def _keys() -> KeySchema:
    return KeySchema(f"test-{uuid.uuid4().hex[:8]}")


async def test_replicas_batches_merge_into_one_summary(redis: Redis) -> None:
    keys = _keys()
    a, b = TrafficBoard(redis, keys, rate_window_s=5), TrafficBoard(redis, keys, rate_window_s=5)
    await a.publish(TrafficBatch(arrivals=10, tokens=1000, ttft={Priority.HIGH: [0.1] * 30}))
    await b.publish(TrafficBatch(arrivals=15, tokens=500, ttft={Priority.HIGH: [2.0]},
                                 tpot={Priority.NORMAL: [0.04]}))  # fmt: skip
    await b.publish(TrafficBatch())  # nothing: not written
    assert await redis.xlen(keys.traffic) == 2
    s = await TrafficBoard(redis, keys, rate_window_s=5).summary()
    assert s.arrival_rate == pytest.approx(25 / 5)
    assert s.token_rate == pytest.approx(1500 / 5)
    high = s.of(Priority.HIGH)
    assert high.num_first_tokens == 31 and high.ttft_p99_s == 2.0
    assert s.of(Priority.NORMAL).tpot_p99_s == 0.04


async def test_the_stream_is_capped_and_bad_entries_are_skipped(redis: Redis) -> None:
    keys = _keys()
    board = TrafficBoard(redis, keys, max_entries=10)
    for _ in range(200):
        await board.publish(TrafficBatch(arrivals=1))
    assert await redis.xlen(keys.traffic) < 200
    await redis.xadd(keys.traffic, {"b": "not json"})
    await redis.xadd(keys.traffic, {"other": "1"})
    s = await board.summary()
    assert s.arrival_rate > 0


async def test_a_recorder_flushes_until_stopped_and_once_more(redis: Redis) -> None:
    keys = _keys()
    board = TrafficBoard(redis, keys)
    recorder = TrafficRecorder()
    stop = asyncio.Event()
    task = asyncio.create_task(recorder.run(board, stop, interval_s=0.05))
    recorder.arrived()
    recorder.first_token(Priority.LOW, 0.5)
    for _ in range(500):  # the first flush, by itself (bounded)
        if await redis.xlen(keys.traffic):
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the recorder never flushed")
    recorder.arrived()
    recorder.finished(Priority.LOW, 0.02)
    recorder.served(42)
    stop.set()
    await asyncio.wait_for(task, 5)
    s = await board.summary()
    assert s.arrival_rate * s.rate_window_s == pytest.approx(2)
    assert s.token_rate * s.rate_window_s == pytest.approx(42)
    assert s.of(Priority.LOW).ttft_p99_s == 0.5 and s.of(Priority.LOW).tpot_p99_s == 0.02
