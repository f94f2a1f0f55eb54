"""API keys and per-key rate limits, shared by every gateway replica.

A key has a name, a maximum priority and optional limits (requests and tokens
per minute). Keys come from a JSON file (``SHOAL_KEYS_FILE``) and from Redis
(``<ns>:apikeys``, written by ``shoal keys add``); only SHA-256 digests are
kept. With no key configured anywhere, authentication is off.

Limits are fixed one-minute windows counted in Redis, so they hold across all
replicas: a request is refused with 429 when its key already used its requests
or tokens for the current minute; tokens are counted when a response ends.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator
from redis.asyncio import Redis

from infra.errors import AuthenticationError, RateLimitError
from infra.keys import KeySchema
from infra.records import Priority, Record

# KEYS[1]: request window. ARGV: limit, ttl_s. Count the request unless over the limit.
_TAKE_REQUEST = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if n > tonumber(ARGV[1]) then
  redis.call('DECR', KEYS[1])
  return 0
end
return 1
"""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "sk-shoal-" + secrets.token_urlsafe(24)


class ApiKey(Record):
    """An API key as stored (``<ns>:apikeys`` field = ``sha256``)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    max_priority: Priority = Priority.NORMAL
    requests_per_min: int | None = Field(default=None, ge=1)
    tokens_per_min: int | None = Field(default=None, ge=1)


class _FileKey(BaseModel):
    """One entry of the keys file: the key itself or its SHA-256."""

    model_config = ConfigDict(extra="forbid")
    name: str
    key: str | None = None
    sha256: str | None = None
    max_priority: Priority = Priority.NORMAL
    requests_per_min: int | None = None
    tokens_per_min: int | None = None

    @model_validator(mode="after")
    def _one(self) -> _FileKey:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError(f"key {self.name!r}: give exactly one of 'key' or 'sha256'")
        return self

    def to_key(self) -> ApiKey:
        return ApiKey(
            name=self.name,
            sha256=self.sha256 or digest(self.key or ""),
            max_priority=self.max_priority,
            requests_per_min=self.requests_per_min,
            tokens_per_min=self.tokens_per_min,
        )


def load_keys_file(path: Path) -> dict[str, ApiKey]:
    """``{"keys": [{"name", "key" | "sha256", "max_priority", ...}]}``"""
    raw = json.loads(path.read_text())
    keys = [_FileKey.model_validate(k).to_key() for k in raw.get("keys", [])]
    return {k.sha256: k for k in keys}


class KeyRing:
    """Authenticates bearer tokens and enforces their limits."""

    def __init__(
        self,
        redis: Redis,
        schema: KeySchema,
        file_keys: dict[str, ApiKey],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._schema = schema
        self._file_keys = file_keys
        self._redis_keys: dict[str, ApiKey] = {}
        self._clock = clock
        self._take = redis.register_script(_TAKE_REQUEST)

    async def refresh(self) -> None:
        raw = await self._redis.hgetall(self._schema.api_keys)
        self._redis_keys = {
            (k.decode() if isinstance(k, bytes) else k): ApiKey.model_validate_json(v)
            for k, v in raw.items()
        }

    @property
    def enabled(self) -> bool:
        return bool(self._file_keys or self._redis_keys)

    def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The caller's key; ``None`` when authentication is off."""
        if not self.enabled:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError(
                "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )
        sha = digest(token.strip())
        key = self._file_keys.get(sha) or self._redis_keys.get(sha)
        if key is None:
            raise AuthenticationError("invalid API key", code="invalid_api_key")
        return key

    def _window(self) -> tuple[int, int]:
        now = self._clock()
        minute = int(now // 60)
        return minute, max(1, int(60 - now % 60))

    async def admit(self, key: ApiKey) -> None:
        """Count one request against ``key``'s limits, or raise 429."""
        minute, retry = self._window()
        if key.tokens_per_min is not None:
            used = await self._redis.get(self._schema.rate_window(key.name, "tok", minute))
            if used is not None and int(used) >= key.tokens_per_min:
                raise _limited(f"token limit of {key.tokens_per_min}/min reached", retry)
        if key.requests_per_min is not None:
            window = self._schema.rate_window(key.name, "req", minute)
            if not await self._take(keys=[window], args=[key.requests_per_min, 120]):
                raise _limited(f"request limit of {key.requests_per_min}/min reached", retry)

    async def record_tokens(self, key: ApiKey, tokens: int) -> None:
        if key.tokens_per_min is None or tokens <= 0:
            return
        minute, _ = self._window()
        window = self._schema.rate_window(key.name, "tok", minute)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(window, tokens)
            pipe.expire(window, 120)
            await pipe.execute()

    async def add(self, key: ApiKey) -> None:
        await self._redis.hset(self._schema.api_keys, key.sha256, key.model_dump_json())


def _limited(message: str, retry_after_s: int) -> RateLimitError:
    return RateLimitError(message, code="rate_limit_exceeded",
                          headers={"Retry-After": str(retry_after_s)})  # fmt: skip
