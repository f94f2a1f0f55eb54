"""TLS settings: what contradicts itself is refused before anything starts,
and what a process hands its children configures them the same way; an HTTP
server of Shoal's serves TLS from them."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from infra.serving import run_server
from infra.settings import CommonSettings
from infra.tls import TLS_VARIABLES, ClusterTls, TlsConfigError
from tests.helpers import free_port
from tests.pki import ThrowawayCa


@pytest.fixture
def ca(tmp_path: Path) -> ThrowawayCa:
    return ThrowawayCa.create(tmp_path)


def test_contradictory_settings_are_refused(ca: ThrowawayCa) -> None:
    member = ca.member("m")
    with pytest.raises(TlsConfigError, match="go together"):
        ClusterTls(cert_file=member.cert_file)
    with pytest.raises(TlsConfigError, match="mutual"):
        ClusterTls(cert_file=member.cert_file, key_file=member.key_file, mutual=True)
    with pytest.raises(TlsConfigError, match="CA"):
        ClusterTls(check_hostname=False)
    with pytest.raises(TlsConfigError, match="does not exist"):
        ClusterTls(ca_file=ca.directory / "missing.pem")


def test_a_child_configured_from_the_parents_env_has_the_same_tls(
    ca: ThrowawayCa, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in TLS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert CommonSettings().cluster_tls() == ClusterTls.off()
    for tls in (ca.member("a"), ca.member("b", mutual=True, check_hostname=False), ca.client()):
        with monkeypatch.context() as env:
            for name, value in tls.env().items():
                env.setenv(name, value)
            assert set(tls.env()) <= set(TLS_VARIABLES)
            assert CommonSettings().cluster_tls() == tls


def test_serving_and_scheme_follow_the_certificate(ca: ThrowawayCa) -> None:
    assert ClusterTls.off().scheme == "http" and ClusterTls.off().server_context() is None
    assert ca.client().scheme == "http" and not ca.client().serves
    member = ca.member("m")
    assert member.scheme == "https" and isinstance(member.server_context(), ssl.SSLContext)
    assert member.client_context() is member.client_context()  # made once


@contextlib.asynccontextmanager
async def _serving(tls: ClusterTls) -> AsyncIterator[str]:
    app = Starlette(routes=[Route("/ping", lambda _: PlainTextResponse("pong"))])
    port = free_port()
    task = asyncio.create_task(run_server(app, "127.0.0.1", port, tls=tls))
    url = f"{tls.scheme}://127.0.0.1:{port}/ping"
    try:
        async with httpx.AsyncClient(verify=False) as probe:  # waiting for it to listen
            for _ in range(200):
                with contextlib.suppress(httpx.TransportError):
                    await probe.get(url)
                    break
                await asyncio.sleep(0.05)
        yield url
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_run_server_serves_tls_to_clients_that_trust_the_cluster_ca(
    ca: ThrowawayCa,
) -> None:
    async with _serving(ca.member("server")) as url:
        assert url.startswith("https://")
        async with httpx.AsyncClient(verify=ca.client().client_context()) as client:
            assert (await client.get(url)).text == "pong"
        async with httpx.AsyncClient() as client:  # the system's trust store
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.get(url)
        async with httpx.AsyncClient(verify=ca.client().client_context()) as client:
            with pytest.raises(httpx.TransportError):  # plain HTTP to a TLS port
                await client.get(url.replace("https://", "http://"))


async def test_mutual_tls_refuses_a_client_without_a_certificate(ca: ThrowawayCa) -> None:
    async with _serving(ca.member("server", mutual=True)) as url:
        async with httpx.AsyncClient(verify=ca.member("client").client_context()) as client:
            assert (await client.get(url)).text == "pong"
        async with httpx.AsyncClient(verify=ca.client().client_context()) as client:
            with pytest.raises(httpx.TransportError):
                await client.get(url)
