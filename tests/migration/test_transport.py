"""The KV connector's data path without an engine: two connectors' worker
states on loopback, over CPU caches, for each transport; and the pacing
rule on an injected clock."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from infra.cluster_auth import ClusterKeys, Purpose
from infra.tls import PLAIN, ClusterTls
from migration.kv_connector import LoadOp, ShoalMetadata, _WorkerState
from migration.pacing import Pacer
from migration.transport import TRANSPORTS, ShmTransport
from migration.wire import (
    BlocksRead,
    BlocksStaged,
    Drop,
    Endpoint,
    GetStatus,
    Grant,
    ReadBlocks,
    Reply,
    Revoke,
    StageBlocks,
    StatusReply,
    WireError,
    call,
)
from tests.helpers import free_port
from tests.migration.device import DEVICE
from tests.pki import ThrowawayCa

NUM_BLOCKS = 16
REQUEST = "req-1"
ENGINE_ID = REQUEST + "-0123abcd"  # vLLM's internal id of the request
SOURCE_TABLE = [9, 3, 14, 1, 7, 12]
GRANT = "the-migrations-read-grant"


def _caches(dtype: torch.dtype = torch.float16, fill: bool = True) -> dict[str, torch.Tensor]:
    make = torch.randn if fill else torch.zeros
    shape = (NUM_BLOCKS, 2, 32, 64)
    return {f"model.layers.{i}.attn": make(shape).to(DEVICE, dtype) for i in range(3)}


class Pair:
    def __init__(self, transport: str, dest_dtype: torch.dtype = torch.float16,
                 source_keys: ClusterKeys | None = None, dest_keys: ClusterKeys | None = None,
                 auth: str | None = None, source_tls: ClusterTls = PLAIN,
                 dest_tls: ClusterTls = PLAIN) -> None:  # fmt: skip
        """``auth``: the credential the test's own calls carry (over the
        destination's TLS)."""
        self.source_caches = _caches()
        self.dest_caches = _caches(dest_dtype, fill=False)
        self.source = _WorkerState("127.0.0.1", free_port(), NUM_BLOCKS, transport=transport,
                                   keys=source_keys, tls=source_tls)  # fmt: skip
        self.dest = _WorkerState("127.0.0.1", free_port(), NUM_BLOCKS, transport=transport,
                                 keys=dest_keys, tls=dest_tls)  # fmt: skip
        self.auth = auth
        self.tls = dest_tls
        self.source.register(self.source_caches)
        self.dest.register(self.dest_caches)
        self.source.apply(ShoalMetadata(tables_set={ENGINE_ID: list(SOURCE_TABLE)}))
        self.source.handle(
            Grant(request_id=REQUEST, token=GRANT)
        )  # the migration's source (in-process)
        self.source_port = self.source._server.server_address[1]
        self.dest_port = self.dest._server.server_address[1]

    def stage(self, key: str, first: int, count: int, grant: str = "") -> BlocksStaged:
        request = StageBlocks(key=key, source=f"127.0.0.1:{self.source_port}",
                              request_id=REQUEST, first=first, count=count,
                              grant=grant or GRANT)  # fmt: skip
        reply, _ = call(Endpoint("127.0.0.1", self.dest_port), request, BlocksStaged,
                        auth=self.auth, tls=self.tls)  # fmt: skip
        return reply

    def status(self, port: int | None = None) -> StatusReply:
        endpoint = Endpoint("127.0.0.1", port or self.dest_port)
        return call(endpoint, GetStatus(), StatusReply, auth=self.auth, tls=self.tls)[0]

    def close(self) -> None:
        self.source.close()
        self.dest.close()


@pytest.fixture(params=sorted(TRANSPORTS))
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    p = Pair(request.param)
    yield p
    p.close()


def _same(a: dict[str, torch.Tensor], a_id: int, b: dict[str, torch.Tensor], b_id: int) -> bool:
    return all(torch.equal(a[name][a_id], b[name][b_id]) for name in a)


def test_stages_then_loads_byte_exact_into_the_allocated_blocks(pair: Pair) -> None:
    assert pair.stage("m1", 0, 4).bytes == 4 * pair.source.block_bytes
    assert pair.stage("m1", 4, 2).bytes == 2 * pair.source.block_bytes
    assert pair.status().staging == {"m1": 6}
    local = [2, 5, 11, 0, 15, 8]
    pair.dest.load(LoadOp(ENGINE_ID, "m1", list(range(6)), local))
    assert not pair.dest.take_load_errors()
    for src, dst in zip(SOURCE_TABLE, local, strict=True):
        assert _same(pair.source_caches, src, pair.dest_caches, dst)
    others = set(range(NUM_BLOCKS)) - set(local)
    assert not any(pair.dest_caches[n][b].any() for n in pair.dest_caches for b in others)
    status = pair.status()
    assert status.staging == {} and status.loaded_blocks == 6 and "m1" in status.load_s


def test_a_destination_with_cached_leading_blocks_loads_the_rest(pair: Pair) -> None:
    """vLLM may find the first blocks in the prefix cache: the plan starts later."""
    pair.stage("m2", 0, 6)
    pair.dest.load(LoadOp(ENGINE_ID, "m2", [2, 3, 4, 5], [6, 7, 8, 9]))
    assert not pair.dest.take_load_errors()
    for src, dst in zip(SOURCE_TABLE[2:], [6, 7, 8, 9], strict=True):
        assert _same(pair.source_caches, src, pair.dest_caches, dst)


def test_blocks_never_staged_are_reported_for_recompute(pair: Pair) -> None:
    pair.stage("m3", 0, 2)
    pair.dest.load(LoadOp(ENGINE_ID, "m3", [0, 1, 2, 3], [4, 5, 6, 7]))
    assert pair.dest.take_load_errors() == {6, 7}


def test_a_read_beyond_the_table_is_refused(pair: Pair) -> None:
    with pytest.raises(WireError, match="holds 6 blocks, asked for 4\\+3"):
        pair.stage("m4", 4, 3)
    assert pair.status().staging == {}


def test_drop_forgets_the_staged_blocks(pair: Pair) -> None:
    pair.stage("m5", 0, 3)
    call(Endpoint("127.0.0.1", pair.dest_port), Drop(key="m5"), Reply)
    assert pair.status().staging == {}


def test_a_source_laid_out_otherwise_is_refused() -> None:
    p = Pair("tcp", dest_dtype=torch.bfloat16)
    try:
        with pytest.raises(WireError, match="laid out differently"):
            p.stage("m6", 0, 2)
    finally:
        p.close()


def test_shm_leaves_no_segment_behind() -> None:
    p = Pair("shm")
    try:
        before = set(os.listdir("/dev/shm"))
        p.stage("m7", 0, 6)
        p.dest.load(LoadOp(ENGINE_ID, "m7", list(range(6)), list(range(6))))
        assert _same(p.source_caches, SOURCE_TABLE[5], p.dest_caches, 5)
        assert not {f for f in set(os.listdir("/dev/shm")) - before if f.startswith("shoal-kv-")}
    finally:
        p.close()


def test_shm_without_a_segment_sends_in_the_frame(tmp_path: Path) -> None:
    p = Pair("shm")
    try:
        assert isinstance(p.source._transport, ShmTransport)
        p.source._transport._dir = tmp_path / "missing"  # no segment can be made
        assert p.stage("m8", 0, 3).bytes == 3 * p.source.block_bytes
        p.dest.load(LoadOp(ENGINE_ID, "m8", [0, 1, 2], [0, 1, 2]))
        assert _same(p.source_caches, SOURCE_TABLE[2], p.dest_caches, 2)
    finally:
        p.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_pacer_spaces_chunks_at_the_bound() -> None:
    clock = FakeClock()
    pacer = Pacer(1000.0, clock=clock)
    assert pacer.delay(500) == 0.0  # the first chunk goes at once
    assert pacer.delay(500) == pytest.approx(0.5)  # then the link is busy
    assert pacer.delay(1000) == pytest.approx(1.0)
    clock.now += 5.0  # idle time is not saved up as a burst
    assert pacer.delay(100) == 0.0
    assert pacer.delay(100) == pytest.approx(0.1)


def test_an_unbounded_pacer_never_waits() -> None:
    pacer = Pacer(0.0, clock=FakeClock())
    assert not pacer.bounded and pacer.delay(10**9) == 0.0
    with pytest.raises(ValueError, match=">= 0"):
        Pacer(-1.0)


SECRET = ClusterKeys.of("kv-secret", previous="old-kv-secret")


def test_the_kv_port_serves_members_of_the_cluster_only() -> None:
    """A call without the KV credential, with a wrong one or with the HTTP
    one is refused (and counted); the current and the previous secret's are
    served."""
    kv = SECRET.token(Purpose.KV)
    pair = Pair("tcp", source_keys=SECRET, dest_keys=SECRET, auth=kv)
    try:
        port = Endpoint("127.0.0.1", pair.dest_port)
        for wrong in (None, "", ClusterKeys.of("other").token(Purpose.KV),
                      SECRET.token(Purpose.HTTP)):  # fmt: skip
            with pytest.raises(WireError, match="unauthenticated"):
                call(port, GetStatus(), StatusReply, auth=wrong)
        assert pair.status().unauthenticated == 4
        old = ClusterKeys.of("old-kv-secret").token(Purpose.KV)
        assert call(port, GetStatus(), StatusReply, auth=old)[0].ok
        assert pair.stage("a1", 0, 2).bytes == 2 * pair.source.block_bytes  # peer to peer
    finally:
        pair.close()


def test_a_destination_of_another_cluster_cannot_read_blocks() -> None:
    """A connector with another secret asks the source for blocks: refused,
    nothing staged."""
    theirs = ClusterKeys.of("their-secret")
    pair = Pair("tcp", source_keys=SECRET, dest_keys=theirs, auth=theirs.token(Purpose.KV))
    try:
        with pytest.raises(WireError, match="unauthenticated"):
            pair.stage("a2", 0, 2)
        assert pair.status().staging == {}
        pair.auth = SECRET.token(Purpose.KV)
        assert pair.status(pair.source_port).unauthenticated == 1
    finally:
        pair.close()


def test_a_member_without_the_migrations_grant_cannot_read_blocks() -> None:
    """A member of the cluster that does not hold the migration (another
    grant, none, or the grant once revoked) is refused, counted, and nothing
    is staged; the migration's own destination reads."""
    pair = Pair("tcp", source_keys=SECRET, dest_keys=SECRET, auth=SECRET.token(Purpose.KV))
    try:
        source = Endpoint("127.0.0.1", pair.source_port)
        for grant in ("another-migrations-grant", "x"):
            with pytest.raises(WireError, match="not granted"):
                pair.stage("g1", 0, 2, grant=grant)
        with pytest.raises(WireError, match="not granted"):  # a direct read, no grant
            call(source, ReadBlocks(request_id=REQUEST, first=0, count=1), BlocksRead,
                 auth=pair.auth)  # fmt: skip
        assert pair.status().staging == {}
        status = pair.status(pair.source_port)
        assert status.not_granted == 3 and status.granted == [REQUEST]
        assert pair.stage("g2", 0, 2).bytes == 2 * pair.source.block_bytes
        call(source, Revoke(request_id=REQUEST), Reply, auth=pair.auth)
        with pytest.raises(WireError, match="not granted"):
            pair.stage("g3", 2, 2)
        assert pair.status(pair.source_port).granted == []
    finally:
        pair.close()


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_over_tls_blocks_move_byte_exact_and_plain_tcp_is_refused(
    transport: str, tmp_path: Path
) -> None:
    """Two members with certificates of the cluster's CA move blocks over TLS
    (and the shm transport's handshake through it); a plain-TCP caller and a
    member of another CA get nothing."""
    ca = ThrowawayCa.create(tmp_path / "ca")
    member = ca.member("member")
    pair = Pair(transport, source_tls=member, dest_tls=member)
    try:
        assert pair.stage("t1", 0, 6).bytes == 6 * pair.source.block_bytes
        local = [2, 5, 11, 0, 15, 8]
        pair.dest.load(LoadOp(ENGINE_ID, "t1", list(range(6)), local))
        assert not pair.dest.take_load_errors()
        for src, dst in zip(SOURCE_TABLE, local, strict=True):
            assert _same(pair.source_caches, src, pair.dest_caches, dst)
        port = Endpoint("127.0.0.1", pair.dest_port)
        with pytest.raises(WireError):
            call(port, GetStatus(), StatusReply, timeout_s=5)  # plain TCP to a TLS port
        stranger = ThrowawayCa.create(tmp_path / "other", "another-ca").member("stranger")
        with pytest.raises(WireError, match="CERTIFICATE_VERIFY_FAILED"):
            call(port, GetStatus(), StatusReply, timeout_s=5, tls=stranger)
        assert pair.status().loaded_blocks == 6  # the port still serves its members
    finally:
        pair.close()


def test_a_tls_port_refuses_a_certificate_for_another_host(tmp_path: Path) -> None:
    """Hostname checking: a member whose certificate names another host is not
    trusted, unless the cluster trusts its CA's every certificate."""
    ca = ThrowawayCa.create(tmp_path)
    elsewhere = ca.member("elsewhere", hosts=("10.9.8.7",))
    pair = Pair("tcp", source_tls=elsewhere, dest_tls=elsewhere)
    try:
        with pytest.raises(WireError, match="CERTIFICATE_VERIFY_FAILED"):
            pair.status()
        pair.tls = ca.member("any-member", check_hostname=False)
        assert pair.status().ok
    finally:
        pair.close()


def test_mutual_tls_needs_a_client_certificate_of_the_cluster(tmp_path: Path) -> None:
    ca = ThrowawayCa.create(tmp_path / "ca")
    member = ca.member("member", mutual=True)
    pair = Pair("tcp", source_tls=member, dest_tls=member)
    try:
        assert pair.stage("m1", 0, 2).bytes == 2 * pair.source.block_bytes
        port = Endpoint("127.0.0.1", pair.dest_port)
        stranger = ThrowawayCa.create(tmp_path / "other", "another-ca").member("stranger")
        trusting = ClusterTls(cert_file=stranger.cert_file, key_file=stranger.key_file,
                              ca_file=ca.ca_file)  # fmt: skip
        with pytest.raises(WireError):  # the server refuses its certificate
            call(port, GetStatus(), StatusReply, timeout_s=5, tls=trusting)
    finally:
        pair.close()


def test_a_finished_request_takes_its_read_grant_with_it() -> None:
    """A grant whose revoke never came (the source's revoke call failed) ends
    when vLLM frees the request's blocks."""
    pair = Pair("tcp")
    try:
        assert pair.status(pair.source_port).granted == [REQUEST]
        assert pair.source.finished({ENGINE_ID}) == set()
        assert pair.status(pair.source_port).granted == []
    finally:
        pair.close()
