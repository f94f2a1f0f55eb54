"""HTTP client of the instance workers' ``/generate`` stream."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import httpx

from infra.errors import ErrorDetail
from instance.api import GenerateChunk, GenerateRequest


class UpstreamError(Exception):
    """The instance failed before producing anything; the request can go elsewhere."""


class UpstreamRefused(Exception):
    """The instance refused the request (4xx): the client's error, not retried."""

    def __init__(self, status_code: int, detail: ErrorDetail) -> None:
        super().__init__(detail.message)
        self.status_code = status_code
        self.detail = detail


class InstanceClient:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def stream(
        self, address: str, body: GenerateRequest, headers: dict[str, str]
    ) -> AsyncGenerator[GenerateChunk, None]:
        """Yield the instance's chunks. Raises :class:`UpstreamError` if the
        instance cannot be reached or fails before its first chunk."""
        payload = body.model_dump(exclude_none=True)
        try:
            async with self._client.stream(
                "POST", address + "/generate", json=payload, headers=headers
            ) as resp:
                if resp.status_code >= 500:
                    raise UpstreamError(f"{address} answered {resp.status_code}")
                if resp.status_code >= 400:
                    raw = await resp.aread()
                    detail = ErrorDetail.model_validate(
                        httpx.Response(200, content=raw).json()["error"]
                    )
                    raise UpstreamRefused(resp.status_code, detail)
                async for line in resp.aiter_lines():
                    if line:
                        yield GenerateChunk.model_validate_json(line)
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{address}: {type(exc).__name__}: {exc}") from exc
