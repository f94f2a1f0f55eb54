"""Shoal's KV connector for upstream vLLM: live migration without a patched vLLM.

Loaded through ``kv_transfer_config`` (``kv_connector="ShoalKVConnector"``,
``kv_connector_module_path="migration.kv_connector"``). One instance of the
class runs beside vLLM's scheduler and one inside the worker process that
holds the KV cache tensors.

Scheduler side
  * tells the worker side, step by step, which KV blocks each request holds
    (its block table), so full blocks of a *running* request can be read;
  * keeps the blocks of an aborted request alive until the worker side
    releases them, so a migrating request's last blocks survive its stop on
    the source until the destination holds them (``request_finished`` →
    delayed free → ``get_finished``);
  * on the destination, reports the migrated tokens of a resumed request as
    already computed (``get_num_new_matched_tokens``) and plans their load
    into the blocks vLLM allocated (``update_state_after_alloc``).

Worker side
  * serves block reads of the live cache over TCP (:mod:`migration.wire`);
  * pulls blocks from a source into host staging memory, stage by stage,
    while the request still decodes there (``stage``);
  * copies the staged blocks into the allocated blocks when the resumed
    request is scheduled (``start_load_kv``);
  * pins a migrating request's blocks on the source and releases them when
    told (or when the pin expires, so a vanished peer leaks nothing).

Only full blocks move: the tail (fewer than a block of tokens) is recomputed
on the destination together with the last token, which vLLM must run anyway
to produce logits. Full blocks of a running request never change, so reading
them while the source keeps decoding is safe.
"""

from __future__ import annotations

import collections
import logging
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.request import RequestStatus

from infra.cluster_auth import ClusterKeys, Purpose
from infra.settings import CommonSettings
from infra.tls import PLAIN, ClusterTls
from migration.kv_blocks import BlockMover, distinct_layers
from migration.pacing import Pacer
from migration.transport import AfterLayer, Staged, Transport, make_transport
from migration.wire import (
    NOT_GRANTED,
    TRANSFER_KEY,
    UNAUTHENTICATED,
    BlocksRead,
    BlocksStaged,
    Drop,
    Endpoint,
    GetStatus,
    Grant,
    Grants,
    Pin,
    ReadBlocks,
    Reply,
    Revoke,
    StageBlocks,
    StatusReply,
    Unpin,
    WireError,
    WireRequest,
    authenticated,
    connect,
    parse_reply,
    parse_request,
    recv_frame,
    recv_header,
    refusal,
    send_frame,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

PIN_TTL_S = 60.0
"""A pin not released within this long is dropped (the peer is gone)."""
# Pins and reads name requests by the engine client's id; tables and delayed
# frees use vLLM's internal id (the client's id plus "-" and 8 characters).

RECENT_LOADS = 64
"""Loads whose duration the connector's status reports."""


@dataclass
class LoadOp:
    request_id: str
    key: str
    staged: list[int]
    """Logical block indices in the staging area."""
    local: list[int]
    """Block ids allocated by vLLM, in the same order."""


@dataclass
class ShoalMetadata(KVConnectorMetadata):  # type: ignore[misc]
    tables_set: dict[str, list[int]] = field(default_factory=dict)
    tables_append: dict[str, list[int]] = field(default_factory=dict)
    preempted: list[str] = field(default_factory=list)
    delayed: list[str] = field(default_factory=list)
    loads: list[LoadOp] = field(default_factory=list)


class ShoalKVConnector(KVConnectorBase_V1):  # type: ignore[misc]
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self._block_size = int(vllm_config.cache_config.block_size)
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config  # type: ignore[union-attr]
        # Scheduler side.
        self._plans: dict[str, tuple[str, int, int]] = {}
        self._planned: set[str] = set()
        self._delayed: set[str] = set()
        self._new_delayed: list[str] = []
        # Worker side.
        self._worker: _WorkerState | None = None
        if role == KVConnectorRole.WORKER:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            # Every tensor-parallel rank holds its slice of every layer and
            # serves it on its own port; equal ranks exchange their slices.
            self._worker = _WorkerState(
                host=str(extra.get("host", "127.0.0.1")),
                port=int(extra["port"]) + get_tensor_model_parallel_rank(),
                num_blocks=int(kv_cache_config.num_blocks),
                transport=str(extra.get("transport", "tcp")),
                pace_bytes_per_s=float(extra.get("pace_bytes_per_s", 0.0)),
                # The secret is not in vLLM's config (which vLLM logs): the
                # connector reads it from the instance's settings, as it does.
                keys=CommonSettings().cluster_keys(),
                tls=CommonSettings().cluster_tls(),
            )

    # -- scheduler side ----------------------------------------------------
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        spec = (request.kv_transfer_params or {}).get(TRANSFER_KEY)
        if not spec or request.request_id in self._planned:
            return 0, False
        num_tokens = int(spec["num_tokens"])
        return max(0, num_tokens - num_computed_tokens), False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        spec = (request.kv_transfer_params or {}).get(TRANSFER_KEY)
        if not spec or num_external_tokens == 0:
            return
        end = int(spec["num_tokens"])
        self._plans[request.request_id] = (str(spec["key"]), end - num_external_tokens, end)
        self._planned.add(request.request_id)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = ShoalMetadata()
        bs = self._block_size
        loaded: set[int] = set()
        for new in scheduler_output.scheduled_new_reqs:
            table = list(new.block_ids[0])
            meta.tables_set[new.req_id] = table
            plan = self._plans.pop(new.req_id, None)
            if plan is not None:
                key, start, end = plan
                first, last = start // bs, end // bs
                local = table[first:last]
                meta.loads.append(LoadOp(new.req_id, key, list(range(first, last)), local))
                loaded.update(local)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            if new_ids is None:
                continue
            if req_id in cached.resumed_req_ids:
                meta.tables_set[req_id] = list(new_ids[0])
            elif new_ids[0]:
                meta.tables_append[req_id] = list(new_ids[0])
        meta.preempted = sorted(scheduler_output.preempted_req_ids or ())
        meta.delayed, self._new_delayed = self._new_delayed, []
        if loaded and scheduler_output.new_block_ids_to_zero:
            # Blocks this step fills from staging must not be zeroed after.
            scheduler_output.new_block_ids_to_zero = [
                b for b in scheduler_output.new_block_ids_to_zero if b not in loaded
            ]
        for req_id in scheduler_output.finished_req_ids:
            self._planned.discard(req_id)
        return meta

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._plans.pop(request.request_id, None)
        if request.status != RequestStatus.FINISHED_ABORTED:
            return False, None
        # An abort may be a migration's stop: the worker side frees the
        # blocks at once unless the request is pinned.
        self._delayed.add(request.request_id)
        self._new_delayed.append(request.request_id)
        return True, None

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        for req_id in connector_output.finished_sending or ():
            self._delayed.discard(req_id)

    def has_pending_push_work(self) -> bool:
        return bool(self._delayed)

    # -- worker side -------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        assert self._worker is not None and isinstance(connector_metadata, ShoalMetadata)
        self._worker.apply(connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert self._worker is not None and isinstance(meta, ShoalMetadata)
        for op in meta.loads:
            self._worker.load(op)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return

    def wait_for_save(self) -> None:
        return

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self._worker is not None
        return self._worker.finished(finished_req_ids) or None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()


class _WorkerState:
    """Block tables, pins and staging inside vLLM's worker process (one per
    tensor-parallel rank), and the TCP server that exposes them."""

    def __init__(self, host: str, port: int, num_blocks: int, transport: str = "tcp",
                 pace_bytes_per_s: float = 0.0, keys: ClusterKeys | None = None,
                 tls: ClusterTls = PLAIN) -> None:  # fmt: skip
        self._lock = threading.Lock()
        self.keys = keys or ClusterKeys.open()
        """Who may use the port: peers and the worker with the cluster's KV credential."""
        self.tls = tls
        """How the port serves (and reads from its peers): TLS or plain TCP."""
        self.server_tls = tls.server_context()
        self.refused = 0
        self._num_blocks = num_blocks
        self._transport_name = transport
        self._pacer = Pacer(pace_bytes_per_s)
        self._mover: BlockMover | None = None
        self._transport: Transport | None = None
        self._tables: dict[str, list[int]] = {}
        self._versions: dict[str, int] = {}
        self._pins: dict[str, float] = {}
        self._grants = Grants()
        self._delayed: set[str] = set()
        self._release: set[str] = set()
        self._staging: dict[str, list[Staged]] = {}
        self._loads: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
        self._load_errors: set[int] = set()
        self.loaded_blocks = 0
        self._server = _Server((host, port), self)
        threading.Thread(target=self._server.serve_forever, name="shoal-kv", daemon=True).start()
        log.info("Shoal KV connector serving on %s:%d (%s transport%s)", host, port, transport,
                 ", TLS" if tls.serves else "")  # fmt: skip

    # KV cache layout -------------------------------------------------------
    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layers = distinct_layers([kv_caches[name] for name in sorted(kv_caches)])
        self._mover = BlockMover(layers, self._num_blocks)
        self._transport = make_transport(self._transport_name, self._mover.device, self._pacer)
        first = self._mover.layout.layers[0]
        log.info("KV cache on %s: %d layers of %s (block dim %d, %s), %d bytes per block",
                 self._mover.device, len(layers), tuple(layers[0].shape), first.block_dim,
                 first.dtype, self.block_bytes)  # fmt: skip

    @property
    def block_bytes(self) -> int:
        return self._mover.block_bytes if self._mover is not None else 0

    @property
    def mover(self) -> BlockMover:
        if self._mover is None:
            raise RuntimeError("the KV caches are not registered yet")
        return self._mover

    # Scheduler updates (model thread) -------------------------------------
    def apply(self, meta: ShoalMetadata) -> None:
        with self._lock:
            for req_id, table in meta.tables_set.items():
                self._tables[req_id] = table
                self._versions[req_id] = self._versions.get(req_id, 0) + 1
            for req_id, ids in meta.tables_append.items():
                self._tables.setdefault(req_id, []).extend(ids)
            for req_id in meta.preempted:
                self._forget(req_id)
            self._delayed.update(meta.delayed)

    def _internal(self, request_id: str) -> str:
        """vLLM's id for the request the engine client knows as ``request_id``
        (vLLM appends ``-<8 random chars>`` to make ids unique)."""
        if request_id in self._tables:
            return request_id
        prefix = request_id + "-"
        for key in self._tables:
            if key.startswith(prefix) and len(key) == len(prefix) + 8:
                return key
        return request_id

    @staticmethod
    def _external(internal_id: str) -> str:
        head, _, tail = internal_id.rpartition("-")
        return head if head and len(tail) == 8 else internal_id

    def _forget(self, req_id: str) -> None:
        self._tables.pop(req_id, None)
        self._versions[req_id] = self._versions.get(req_id, 0) + 1

    def load(self, op: LoadOp) -> None:
        """Fill the request's blocks from staging, before the step that
        first runs it. Blocks that were never staged are reported to vLLM,
        which recomputes them."""
        t0 = time.monotonic()
        with self._lock:
            staged = self._staging.pop(op.key, [])
        local = dict(zip(op.staged, op.local, strict=True))
        for part in staged:
            indices = [i for i in range(part.first, part.first + part.count) if i in local]
            if not indices:
                continue
            # Staged parts are runs of consecutive logical blocks, and so is the plan.
            start = indices[0] - part.first
            self.mover.scatter(part.buffer, part.count, [local.pop(i) for i in indices], start)
        for part in staged:
            self._free_staged(part)
        if local:
            self._load_errors.update(local.values())
            log.warning("migration %s: %d blocks were not staged; vLLM recomputes them",
                        op.key, len(local))  # fmt: skip
        self.loaded_blocks += len(op.local) - len(local)
        with self._lock:
            self._loads[op.key] = (t0, time.monotonic() - t0)
            while len(self._loads) > RECENT_LOADS:
                self._loads.popitem(last=False)

    def _free_staged(self, part: Staged) -> None:
        assert self._transport is not None
        self._transport.release(part)

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def finished(self, finished_req_ids: set[str]) -> set[str]:
        now = time.monotonic()
        with self._lock:
            for req_id, since in list(self._pins.items()):
                if now - since > PIN_TTL_S:
                    log.warning("pin on %s expired: releasing its blocks", req_id)
                    del self._pins[req_id]
                    self._release.update(d for d in self._delayed if self._external(d) == req_id)
            for req_id in finished_req_ids:
                if req_id in self._delayed and self._external(req_id) not in self._pins:
                    self._release.add(req_id)
                elif req_id not in self._delayed:
                    self._end(req_id)
            done, self._release = self._release, set()
            for req_id in done:
                self._delayed.discard(req_id)
                self._end(req_id)
            return done

    def _end(self, req_id: str) -> None:
        """The request's blocks are free: forget its table, and its read grant
        (if its migration's own revoke never came, the source being unreachable)."""
        self._forget(req_id)
        self._grants.revoke(self._external(req_id))

    # Requests from the wire (server threads) ------------------------------
    def handle(self, request: WireRequest) -> Reply:
        match request:
            case ReadBlocks():
                raise AssertionError("reads are served by serve_read")
            case StageBlocks():
                return self._stage(request)
            case Grant():
                with self._lock:
                    self._grants.grant(request.request_id, request.token)
            case Revoke():
                with self._lock:
                    self._grants.revoke(request.request_id)
            case Pin():
                with self._lock:
                    self._pins[request.request_id] = time.monotonic()
            case Unpin():
                with self._lock:
                    self._pins.pop(request.request_id, None)
                    self._release.update(d for d in self._delayed
                                         if self._external(d) == request.request_id)  # fmt: skip
            case Drop():
                with self._lock:
                    dropped = self._staging.pop(request.key, [])
                for part in dropped:
                    self._free_staged(part)
            case GetStatus():
                with self._lock:
                    return StatusReply(
                        pinned=sorted(self._pins), delayed=sorted(self._delayed),
                        staging={k: sum(p.count for p in v) for k, v in self._staging.items()},
                        block_bytes=self.block_bytes, tables=len(self._tables),
                        loaded_blocks=self.loaded_blocks,
                        load_s={k: v[1] for k, v in self._loads.items()},
                        load_at={k: v[0] for k, v in self._loads.items()},
                        unauthenticated=self.refused, granted=self._grants.granted,
                        not_granted=self._grants.refused,
                    )  # fmt: skip
        return Reply()

    def serve_read(self, sock: socket.socket, request: ReadBlocks) -> None:
        """Gather the blocks and send them with the transport, or refuse."""
        first, count = request.first, request.count
        with self._lock:
            if not self._grants.allows(request):
                log.warning("KV port: refused a read of %s without its migration's grant",
                            request.request_id)  # fmt: skip
                send_frame(sock, refusal(NOT_GRANTED))
                return
            req_id = self._internal(request.request_id)
            table = list(self._tables.get(req_id, ()))
            version = self._versions.get(req_id, 0)
        if first + count > len(table):
            send_frame(sock, refusal(f"{req_id} holds {len(table)} blocks, asked for "
                                     f"{first}+{count}"))  # fmt: skip
            return
        ids = table[first : first + count]
        mover = self.mover
        reply = BlocksRead(count=count, bytes=count * mover.block_bytes, request_id=req_id,
                           first=first, block_ids=ids, layout=mover.layout)  # fmt: skip

        def fill(buffer: torch.Tensor, after_layer: AfterLayer) -> str | None:
            mover.gather(ids, buffer, after_layer)
            with self._lock:  # a preemption or finish meanwhile makes the copy void
                if self._versions.get(req_id, 0) != version or req_id not in self._tables:
                    return f"{req_id} lost its blocks during the read"
            return None

        assert self._transport is not None
        self._transport.send(sock, reply, fill)

    def _stage(self, request: StageBlocks) -> Reply:
        """Pull blocks from the source into staging (they load at the first step)."""
        read = ReadBlocks(request_id=request.request_id, first=request.first, count=request.count,
                          grant=request.grant)  # fmt: skip
        source = Endpoint.parse(request.source)
        try:
            with connect(source, self.tls) as sock:
                send_frame(sock, read, auth=self.keys.token(Purpose.KV))
                header, _ = recv_header(sock)
                reply = parse_reply(header, BlocksRead, f"read from {source}")
                problem = self._check(reply, request.count)
                if problem is not None:
                    return refusal(problem)
                assert self._transport is not None
                part = self._transport.receive(sock, reply)
        except (WireError, OSError) as exc:
            return refusal(str(exc))
        with self._lock:
            self._staging.setdefault(request.key, []).append(part)
        return BlocksStaged(blocks=request.count, bytes=reply.bytes)

    def _check(self, reply: BlocksRead, count: int) -> str | None:
        if reply.layout is None:
            return "the source sent no KV layout"
        mismatch = self.mover.layout.mismatch(reply.layout)
        if mismatch is not None:
            return f"the source's KV cache is laid out differently: {mismatch}"
        if reply.count != count or reply.bytes != count * self.block_bytes:
            return f"got {reply.bytes} bytes for {reply.count} blocks, asked for {count}"
        return None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        context = self.server.state.server_tls
        try:
            if context is not None:
                try:
                    sock = context.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    log.warning("KV port: refused a connection without TLS: %s", exc)
                    return
            header, _ = recv_frame(sock)
            if not authenticated(header, self.server.state.keys):
                log.warning("KV port: refused a connection without the cluster credential")
                self.server.state.refused += 1
                send_frame(sock, refusal(UNAUTHENTICATED))
                return
            try:
                request = parse_request(header)
                if isinstance(request, ReadBlocks):
                    self.server.state.serve_read(sock, request)
                    return
                reply = self.server.state.handle(request)
            except (ConnectionError, OSError):
                raise
            except Exception as exc:  # a bad request must not kill the server
                log.exception("KV connector request failed")
                reply = refusal(f"{type(exc).__name__}: {exc}")
            send_frame(sock, reply)
        except (ConnectionError, OSError) as exc:
            log.debug("KV connector connection dropped: %s", exc)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: _WorkerState) -> None:
        self.state = state
        super().__init__(address, _Handler)
