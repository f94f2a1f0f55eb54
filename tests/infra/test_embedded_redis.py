"""The embedded Valkey server: discovery per checkout and clean shutdown."""

from __future__ import annotations

import os
from pathlib import Path

from infra.embedded_redis import EmbeddedRedis, find_running, resolve_redis


def test_explicit_url_wins(tmp_path: Path) -> None:
    assert resolve_redis("redis://h:1/0", tmp_path) == ("redis://h:1/0", None)


def test_start_discover_and_stop(tmp_path: Path) -> None:
    assert resolve_redis(None, tmp_path, start=False) == (None, None)
    url, server = resolve_redis(None, tmp_path)
    assert server is not None and url == server.url
    try:
        assert find_running(tmp_path) == url
        again, owned = resolve_redis(None, tmp_path)
        assert (again, owned) == (url, None)
    finally:
        server.stop()
    assert server.process.poll() is not None
    assert find_running(tmp_path) is None
    assert not (tmp_path / "redis.json").exists()


def test_server_shares_the_owners_session_not_its_process_group(tmp_path: Path) -> None:
    """Its own process group keeps a terminal's Ctrl-C off it; the owner's
    session keeps it in the owner's scheduler autogroup (in a session of its
    own, busy engines starved it for seconds)."""
    server = EmbeddedRedis.start(tmp_path / "valkey")
    try:
        pid = server.process.pid
        assert os.getsid(pid) == os.getsid(0)
        assert os.getpgid(pid) == pid != os.getpgid(0)
    finally:
        server.stop()
    assert (tmp_path / "valkey" / "valkey.err").exists()
