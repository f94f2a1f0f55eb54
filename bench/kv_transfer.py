"""KV transfer throughput of Shoal's connector against plain loopback TCP.

Two processes on loopback, as two instances on one host: a source whose KV
connector serves a request's blocks out of a KV cache, and a destination
whose connector stages them (``StageBlocks``: gather, one framed message,
``recv_into``) and then loads them into its own cache (``index_copy_``).
Both are the real connector code (``migration.kv_connector``) over CPU
tensors laid out as vLLM's CPU backend lays them out; no engine runs. The
baseline is the same bytes sent from a memoryview with ``sendall`` and
received with ``recv_into`` between two Python processes.

    .venv/bin/python -m bench.kv_transfer [--transports tcp,shm] [--repeats 7]

The last line is ``ratio_to_loopback=<x>``: staging throughput over the
loopback baseline for the issue's request (the tiny model, 15,000 tokens,
TCP transport).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import struct
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from typing import Any

from bench.common import PLOTS, free_port

MiB = 1024 * 1024
_SIZE = struct.Struct(">Q")


@dataclass(frozen=True)
class Model:
    """A KV cache: per layer ``[num_blocks, heads, block_size, 2 * head]``."""

    name: str
    layers: int
    heads: int
    head: int
    block_size: int
    dtype: str

    @property
    def block_bytes(self) -> int:
        itemsize = 4 if self.dtype == "float32" else 2
        return self.layers * self.heads * self.block_size * 2 * self.head * itemsize


TINY = Model("tiny-llama f32", layers=2, heads=2, head=64, block_size=32, dtype="float32")
LLAMA = Model("llama-7b f16", layers=32, heads=32, head=128, block_size=16, dtype="float16")
CASES: list[tuple[Model, int]] = [  # (model, tokens)
    (TINY, 1024), (TINY, 4096), (TINY, 15000), (TINY, 60000), (LLAMA, 256), (LLAMA, 1024),
]  # fmt: skip
HEADLINE = (TINY, 15000)


def _caches(model: Model, num_blocks: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # as an engine pinned to its core (VLLM_CPU_OMP_THREADS_BIND)
    dtype = getattr(torch, model.dtype)
    shape = (num_blocks, model.heads, model.block_size, 2 * model.head)
    return {f"layers.{i}.attn": torch.randn(shape).to(dtype) for i in range(model.layers)}


GRANT = "the-benchmark-migrations-read-grant"


def _source(port: int, model: Model, num_blocks: int, transport: str, ready: Event,
            stop: Event) -> None:  # fmt: skip
    from migration.kv_connector import ShoalMetadata, _WorkerState
    from migration.wire import Grant

    state = _WorkerState("127.0.0.1", port, num_blocks, transport=transport)
    state.register(_caches(model, num_blocks))
    # One request holding every block but the first, in reverse order.
    state.apply(ShoalMetadata(tables_set={"req-0123abcd": list(range(num_blocks - 1, 0, -1))}))
    state.handle(Grant(request_id="req", token=GRANT))  # as a migration's source does
    ready.set()
    stop.wait()
    state.close()


def _loopback_source(port: int, nbytes: int, ready: Event, stop: Event) -> None:
    with socket.create_server(("127.0.0.1", port)) as server:
        ready.set()
        server.settimeout(0.2)
        payload = memoryview(bytearray(nbytes))
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                (n,) = _SIZE.unpack(conn.recv(_SIZE.size, socket.MSG_WAITALL))
                conn.sendall(payload[:n])


def _start(target: Any, *args: Any) -> tuple[Any, Event]:
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=target, args=(*args, ready, stop), daemon=True)
    proc.start()
    if not ready.wait(120):
        proc.kill()
        raise RuntimeError("the source process did not start")
    return proc, stop


def loopback_mib_s(nbytes: int, repeats: int) -> float:
    port = free_port()
    proc, stop = _start(_loopback_source, port, nbytes)
    buf = memoryview(bytearray(nbytes))
    times = []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(_SIZE.pack(nbytes))
                got = 0
                while got < nbytes:
                    got += sock.recv_into(buf[got:], nbytes - got)
            times.append(time.perf_counter() - t0)
    finally:
        stop.set()
        proc.join(5)
    return nbytes / MiB / statistics.median(times)


def connector_mib_s(model: Model, tokens: int, transport: str,
                    repeats: int) -> tuple[float, float, int]:  # fmt: skip
    """(staging MiB/s, loading MiB/s, bytes) for one request's full blocks."""
    from migration.kv_connector import LoadOp, _WorkerState
    from migration.wire import BlocksStaged, Endpoint, StageBlocks, call

    count = (tokens - 1) // model.block_size
    num_blocks = count + 2
    port, dst_port = free_port(), free_port()
    proc, stop = _start(_source, port, model, num_blocks, transport)
    dest = _WorkerState("127.0.0.1", dst_port, num_blocks, transport=transport)
    dest.register(_caches(model, num_blocks))
    stage_s, load_s = [], []
    try:
        for i in range(repeats):
            key = f"k{i}"
            request = StageBlocks(key=key, source=f"127.0.0.1:{port}", request_id="req",
                                  first=0, count=count, grant=GRANT)  # fmt: skip
            t0 = time.perf_counter()
            reply, _ = call(Endpoint("127.0.0.1", dst_port), request, BlocksStaged)
            stage_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            dest.load(LoadOp("req", key, list(range(count)), list(range(count, 0, -1))))
            load_s.append(time.perf_counter() - t0)
            assert not dest.take_load_errors()
    finally:
        dest.close()
        stop.set()
        proc.join(5)
    nbytes = reply.bytes
    return (nbytes / MiB / statistics.median(stage_s), nbytes / MiB / statistics.median(load_s),
            nbytes)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--transports", default="tcp,shm")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    transports = args.transports.split(",")
    rows = []
    for model, tokens in CASES:
        for transport in transports:
            stage, load, nbytes = connector_mib_s(model, tokens, transport, args.repeats)
            base = loopback_mib_s(nbytes, args.repeats)
            rows.append((model, tokens, transport, nbytes, stage, load, base))
            print(f"{model.name} {tokens} tokens {transport}: {stage:.0f} MiB/s staged, "
                  f"{load:.0f} MiB/s loaded, loopback {base:.0f} MiB/s", flush=True)  # fmt: skip
    print(f"\n{'model':<15} {'tokens':>7} {'MiB':>7} {'transport':<9} {'staged MiB/s':>12} "
          f"{'loaded MiB/s':>12} {'loopback MiB/s':>14} {'ratio':>6}")  # fmt: skip
    for model, tokens, transport, nbytes, stage, load, base in rows:
        print(f"{model.name:<15} {tokens:>7} {nbytes / MiB:>7.1f} {transport:<9} {stage:>12.0f} "
              f"{load:>12.0f} {base:>14.0f} {stage / base:>6.2f}")  # fmt: skip
    _plot(rows, transports)
    headline = [r for r in rows if (r[0], r[1]) == HEADLINE and r[2] == "tcp"]
    if headline:
        _, _, _, _, stage, _, base = headline[0]
        print(f"ratio_to_loopback={stage / base:.2f}")


def _plot(rows: list[Any], transports: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for transport in transports:
        pts = sorted((r[3] / MiB, r[4]) for r in rows if r[2] == transport)
        ax.plot(
            [p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"connector, {transport}"
        )
    base = sorted((r[3] / MiB, r[6]) for r in rows if r[2] == transports[0])
    ax.plot([p[0] for p in base], [p[1] for p in base], marker="x", ls="--", label="loopback TCP")
    ax.set_xscale("log")
    ax.set_xlabel("stage size (MiB)")
    ax.set_ylabel("MiB/s (median)")
    ax.set_title("KV staging throughput vs loopback TCP (CPU)")
    ax.legend()
    fig.tight_layout()
    path = PLOTS / "kv_transfer.png"
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
