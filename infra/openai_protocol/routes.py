"""The two OpenAI completion endpoints, mounted over one ``serve`` function
(the gateway dispatches, an instance answers itself)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Header, Request, Response

from infra.openai_protocol.models import ChatCompletionRequest, CompletionRequest

Serve = Callable[[Request, ChatCompletionRequest | CompletionRequest, str | None],
                 Awaitable[Response]]  # fmt: skip
"""``serve(request, body, X-Request-Priority header)``."""


def add_completion_routes(app: FastAPI, serve: Serve) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(
        body: ChatCompletionRequest,
        request: Request,
        x_request_priority: str | None = Header(default=None),
    ) -> Response:
        return await serve(request, body, x_request_priority)

    @app.post("/v1/completions")
    async def completions(
        body: CompletionRequest,
        request: Request,
        x_request_priority: str | None = Header(default=None),
    ) -> Response:
        return await serve(request, body, x_request_priority)
