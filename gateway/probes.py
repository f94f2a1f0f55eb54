"""The endpoints clients probe before they send work, as ``vllm serve``
answers them: ``GET /health``, ``GET /version``, and ``POST /tokenize`` /
``POST /detokenize``, which go to an instance of the request's model (the
tokenizer lives there) and need an API key like a completion when keys are
configured."""

from __future__ import annotations

from typing import Protocol

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel

from gateway.auth import KeyRing
from gateway.dispatcher import Dispatcher
from gateway.upstream import InstanceClient, UpstreamError
from infra.errors import ServiceUnavailableError
from infra.openai_protocol.models import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
    shoal_version,
)


class _State(Protocol):
    """What the probes need of the gateway's state (``gateway.app.GatewayState``)."""

    keys: KeyRing
    dispatcher: Dispatcher
    client: InstanceClient


def add_probe_routes(app: FastAPI) -> None:
    async def forward(request: Request, model: str, path: str, body: BaseModel) -> Response:
        st: _State = request.app.state.shoal
        st.keys.authenticate(request.headers.get("authorization"))
        address = st.dispatcher.any_instance(model)
        try:
            status, raw = await st.client.call(address, path, body)
        except UpstreamError as exc:
            raise ServiceUnavailableError(f"{path} failed on an instance: {exc}",
                                          retry_after_s=1) from exc  # fmt: skip
        if status >= 500:
            raise ServiceUnavailableError(f"{path} failed on an instance ({status})",
                                          retry_after_s=1)  # fmt: skip
        return Response(raw, status_code=status, media_type="application/json")

    @app.get("/health")
    async def health() -> Response:
        """200 with an empty body while the gateway runs, as vLLM's."""
        return Response(status_code=200)

    @app.get("/version", response_model=VersionResponse)
    async def version() -> VersionResponse:
        return VersionResponse(version=shoal_version())

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest, request: Request) -> Response:
        return await forward(request, body.model, "/tokenize", body)

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest, request: Request) -> Response:
        return await forward(request, body.model, "/detokenize", body)
