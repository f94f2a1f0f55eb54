"""OpenAI's HTTP protocol as Shoal speaks it: request and response bodies,
their translation to and from instance requests and chunks, and rendering a
chunk stream as SSE or a whole response. Shared by the gateway and by the
instance worker's own ``/v1`` endpoints."""
