"""The cluster credential: what every internal call carries.

Everything behind the gateway (gateway → instance, instance ↔ instance for
migration, autoscaler → instance, the KV port) is a trust boundary of its
own. One cluster secret is shared by every member; the credential a member
sends is derived from it per purpose (HTTP, KV wire), so the secret itself
never travels. A rotation runs with two secrets: every member accepts the
current and the previous one and sends the current, so members can be
restarted onto a new secret one by one (docs/SECURITY.md).

A cluster with no secret is *open*: it accepts every call. Only an explicit
``SHOAL_INSECURE_OPEN_CLUSTER=true`` (or ``shoal up``'s generated secret) lets
a process start without one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

CLUSTER_HEADER = "x-shoal-cluster-token"
"""The HTTP header of the credential."""

RESUME_TOKEN_HEADER = "x-shoal-resume-token"
"""The HTTP header of a request's resume token (``GenerateRequest.resume_token``):
only the gateway that dispatched a request can resume it after a migration."""


class Purpose(StrEnum):
    """What a credential is for: each gets a token of its own."""

    HTTP = "http"
    KV = "kv"


class ClusterSecretMissing(Exception):
    """No cluster secret is configured and the cluster is not declared open."""


SECRET_VARIABLES = ("SHOAL_CLUSTER_SECRET", "SHOAL_CLUSTER_SECRET_FILE",
                    "SHOAL_INSECURE_OPEN_CLUSTER")  # fmt: skip
"""The variables that configure a process's cluster secret (or its absence)."""


def new_secret() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ClusterKeys:
    """The cluster secrets this process knows: the current one (None: an open
    cluster) and, during a rotation, the previous one."""

    current: bytes | None
    previous: bytes | None = None

    @classmethod
    def open(cls) -> ClusterKeys:
        return cls(None)

    @classmethod
    def of(cls, current: str, previous: str | None = None) -> ClusterKeys:
        return cls(current.encode(), previous.encode() if previous else None)

    @classmethod
    def from_file(cls, path: Path) -> ClusterKeys:
        """A secret file: the current secret on its first line, the previous
        one (during a rotation) on its second."""
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            raise ClusterSecretMissing(f"the cluster secret file {path} is empty")
        return cls.of(lines[0], lines[1] if len(lines) > 1 else None)

    @property
    def is_open(self) -> bool:
        return self.current is None

    def token(self, purpose: Purpose) -> str | None:
        """What this member sends (None: an open cluster sends nothing)."""
        return None if self.current is None else _derive(self.current, purpose)

    def accepts(self, token: str | None, purpose: Purpose) -> bool:
        """Whether ``token`` is the credential of the current or the previous
        secret (always, in an open cluster); compared in constant time."""
        return self._matches(token, _label(purpose))

    def prove(self, nonce: str, who: str) -> str:
        """``who``'s answer to a challenge: proof that it holds the current
        secret ("" in an open cluster)."""
        if self.current is None:
            return ""
        return _mac(self.current, _hello(nonce, who))

    def verify_proof(self, nonce: str, who: str, proof: str) -> bool:
        """Whether ``proof`` answers ``nonce`` for ``who`` with the current or
        the previous secret (always, in an open cluster)."""
        return self._matches(proof, _hello(nonce, who))

    def _matches(self, given: str | None, label: str) -> bool:
        """Whether ``given`` is ``label``'s MAC under the current or the
        previous secret (always, in an open cluster)."""
        if self.current is None:
            return True
        if not given:
            return False
        ok = False
        for secret in (self.current, self.previous):
            if secret is not None:  # no early exit: the time does not tell which
                ok |= hmac.compare_digest(given.encode(), _mac(secret, label).encode())
        return ok

    def env(self) -> dict[str, str]:
        """These secrets as ``SHOAL_*`` variables, for the processes this one
        starts (vLLM's, with the KV connector in them; instances on Ray nodes)."""
        if self.current is None:
            return {"SHOAL_INSECURE_OPEN_CLUSTER": "true"}
        env = {"SHOAL_CLUSTER_SECRET": self.current.decode()}
        if self.previous is not None:
            env["SHOAL_CLUSTER_SECRET_PREVIOUS"] = self.previous.decode()
        return env

    def headers(self) -> dict[str, str]:
        """HTTP headers of an internal call."""
        token = self.token(Purpose.HTTP)
        return {} if token is None else {CLUSTER_HEADER: token}


def _derive(secret: bytes, purpose: Purpose) -> str:
    return _mac(secret, _label(purpose))


def _label(purpose: Purpose) -> str:
    return f"shoal/cluster/{purpose.value}/v1"


def _hello(nonce: str, who: str) -> str:
    return f"shoal/cluster/hello/v1/{nonce}/{who}"


def _mac(secret: bytes, label: str) -> str:
    return hmac.new(secret, label.encode(), hashlib.sha256).hexdigest()
