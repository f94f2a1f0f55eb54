"""The embedded Valkey server: discovery per checkout and clean shutdown."""

from __future__ import annotations

from pathlib import Path

from infra.embedded_redis import find_running, resolve_redis


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
