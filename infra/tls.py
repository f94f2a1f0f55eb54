"""Optional TLS for the data plane: the instances' HTTP and their KV ports.

The cluster credential (:mod:`infra.cluster_auth`) says who may call; TLS
keeps what the calls carry (prompts, generated text, KV blocks) private on
the wire. It is configured from files:

- a member's certificate chain and key: with them, its instance HTTP server
  and its KV port serve TLS only, and it registers an ``https://`` address;
- the CA bundle that signs the members' certificates, which every client
  (gateways, the autoscaler, instances reading from each other) verifies
  servers against;
- whether a server's certificate must name the host it is reached at (the
  default) or need only be signed by the cluster's CA: a private CA that signs
  members only, so one cluster certificate serves every node of a fleet whose
  addresses come and go (Ray nodes, pods);
- mutual TLS: servers then also require a client certificate from the CA.

TLS is a property of the whole cluster: a member with TLS reads KV blocks
from its peers over TLS, so every instance of a cluster either has it or not.
"""

from __future__ import annotations

import functools
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

TLS_VARIABLES = ("SHOAL_TLS_CERT_FILE", "SHOAL_TLS_KEY_FILE", "SHOAL_TLS_CA_FILE",
                 "SHOAL_TLS_CHECK_HOSTNAME", "SHOAL_TLS_MUTUAL")  # fmt: skip
"""The variables that configure a process's TLS."""


class TlsConfigError(ValueError):
    """The TLS settings contradict each other or name unreadable files."""


@dataclass(frozen=True)
class ClusterTls:
    """How this process speaks TLS to (and as) a member of the cluster."""

    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    check_hostname: bool = True
    mutual: bool = False

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise TlsConfigError("SHOAL_TLS_CERT_FILE and SHOAL_TLS_KEY_FILE go together")
        if self.mutual and (self.ca_file is None or self.cert_file is None):
            raise TlsConfigError(
                "mutual TLS (SHOAL_TLS_MUTUAL) needs SHOAL_TLS_CA_FILE and this "
                "member's certificate (SHOAL_TLS_CERT_FILE, SHOAL_TLS_KEY_FILE)"
            )
        if not self.check_hostname and self.ca_file is None:
            raise TlsConfigError(
                "SHOAL_TLS_CHECK_HOSTNAME=false needs the cluster's own CA (SHOAL_TLS_CA_FILE): "
                "any certificate of a public CA would do otherwise"
            )
        for path in (self.cert_file, self.key_file, self.ca_file):
            if path is not None and not path.is_file():
                raise TlsConfigError(f"TLS file {path} does not exist")

    @classmethod
    def off(cls) -> ClusterTls:
        return cls()

    @property
    def serves(self) -> bool:
        """Whether this member's HTTP server and KV port speak TLS."""
        return self.cert_file is not None

    @property
    def scheme(self) -> str:
        return "https" if self.serves else "http"

    def server_context(self) -> ssl.SSLContext | None:
        """The context of this member's servers (None: plain TCP)."""
        if self.cert_file is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.mutual:
            ctx.load_verify_locations(cafile=self.ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """:meth:`new_client_context`, made once (a context loads its CA
        bundle when made; one is shared by every connection and thread)."""
        return self._client_context

    @functools.cached_property
    def _client_context(self) -> ssl.SSLContext:
        return self.new_client_context()

    def new_client_context(self) -> ssl.SSLContext:
        """The context for calling members over TLS: servers verified against
        the cluster's CA (the system's trust store when none is set), this
        member's certificate presented (for mutual TLS)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = self.check_hostname
        if self.cert_file is not None:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def wrap_client(self, sock: socket.socket, host: str) -> socket.socket:
        """``sock`` (connected to a member's KV port on ``host``) over TLS
        when this member speaks it (handshake done), else as it is."""
        if not self.serves:
            return sock
        return self.client_context().wrap_socket(sock, server_hostname=host)

    def uvicorn_options(self) -> dict[str, object]:
        """uvicorn's ``Config`` arguments for serving this member's HTTP."""
        if self.cert_file is None:
            return {}
        options: dict[str, object] = {
            "ssl_certfile": str(self.cert_file),
            "ssl_keyfile": str(self.key_file),
        }
        if self.mutual:
            options |= {"ssl_ca_certs": str(self.ca_file), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        return options

    def env(self) -> dict[str, str]:
        """These settings as ``SHOAL_TLS_*`` variables, for the processes this
        one starts (instances started by the autoscaler, vLLM's workers)."""
        env = {name: str(value) for name, value in (
            ("SHOAL_TLS_CERT_FILE", self.cert_file), ("SHOAL_TLS_KEY_FILE", self.key_file),
            ("SHOAL_TLS_CA_FILE", self.ca_file),
        ) if value is not None}  # fmt: skip
        if not self.check_hostname:
            env["SHOAL_TLS_CHECK_HOSTNAME"] = "false"
        if self.mutual:
            env["SHOAL_TLS_MUTUAL"] = "true"
        return env


PLAIN = ClusterTls()
"""No TLS: plain TCP (the default of an in-process port or client)."""
